"""Optimizer lifecycle edge cases (issue 14, items 9-12, 15, 16, 18): untagged-only steps, reserved
task names, all tasks non-finite, constructor validation, closures (LBFGS), supported optimizers,
stale gradients, numpy task ids, a string as the task list, meta-device parameters, state dicts
that do not fit. Each test failed before its fix unless it says it guards documented behaviour."""

from __future__ import annotations

import copy
import inspect
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from balancedmix import BalancedOptimizer, GradientMismatchError, NonFiniteGradientError
from balancedmix import tasks as tasks_module
from balancedmix.analysis import load_run
from balancedmix.tasks import TaskError, TaskRegistry, resolve_task, task_labels

TASKS = ["a", "b"]


class Net(torch.nn.Module):
    def __init__(self, seed: int = 0, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Linear(4, 6, bias=bias)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 2, bias=bias) for t in TASKS})

    def loss(self, task: str, x: torch.Tensor) -> torch.Tensor:
        return (self.heads[task](torch.tanh(self.trunk(x))) - 0.3).pow(2).mean()


def data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(5, 4, generator=g) for t in TASKS}


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# ---------------------------------------------------------------------------------- item 9
def test_backward_after_the_task_block_warns_once_and_says_so():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="normalize")
    x = data()
    with pytest.warns(UserWarning, match=r"outside.*opt\.task.*'normalize' corrected nothing"):
        with opt.task("a"):
            loss = model.loss("a", x["a"])
        loss.backward()  # the block already closed: untagged
        opt.step()
    d = opt.diagnostics()
    assert d["untagged_only"] == 1.0
    assert d["update_share/untagged"] == 1.0
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer, not every step
        model.loss("a", x["a"]).backward()
        opt.step()
    assert opt.diagnostics()["untagged_only"] == 1.0
    opt.zero_grad()
    with opt.task("a"):
        model.loss("a", x["a"]).backward()
    opt.step()
    assert "untagged_only" not in opt.diagnostics()


# ---------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("name", ["total", "update", "untagged", "a/b", "", "math/"])
def test_reserved_or_ambiguous_task_names_are_rejected(name):
    with pytest.raises(TaskError, match="docs/diagnostics.md") as err:
        TaskRegistry(["ok", name])
    assert repr(name) in str(err.value)
    open_registry = TaskRegistry()
    with pytest.raises(TaskError, match=re.escape(repr(name))):
        open_registry.index(name)
    assert open_registry.names == ()
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TaskError):
        with opt.task(name):
            pass
    with pytest.raises(TaskError):
        BalancedOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), tasks=["a", name])


def test_reserved_names_are_the_ones_the_diagnostics_use():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    x = data()
    with opt.task("a"):
        model.loss("a", x["a"]).backward()
    model.loss("b", x["b"]).backward()
    opt.step()
    used = {k.split("/")[1] for k in opt.diagnostics() if k.startswith("grad_norm/")}
    assert used - {"a"} <= set(tasks_module.RESERVED_TASK_NAMES)
    assert {"total", "update", "untagged"} <= set(tasks_module.RESERVED_TASK_NAMES)


def test_sampler_rejects_a_task_name_with_a_slash():
    from balancedmix.sampler import MixtureSampler

    rows = [{"task": "math/algebra"}, {"task": "code"}]
    with pytest.raises(TaskError, match="'math/algebra'"):
        MixtureSampler(rows, prompts_per_batch=1)


def test_report_reader_uses_the_same_reserved_names(tmp_path):
    """Guard: the report reads the reserved names from the same constant."""
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "grad_norm/a": 1.0, "grad_norm/total": 2.0, "grad_norm/update": 2.0, "grad_norm/untagged": 0.5}\n'
    )
    assert load_run(tmp_path).tasks == ("a",)


# ---------------------------------------------------------------------------------- item 11
def test_skip_task_with_every_task_nonfinite_does_not_step():
    model = Net(3)
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), nonfinite="skip_task", method="mean")
    x = data(3)
    with opt.task("a"):
        model.loss("a", x["a"]).backward()
    opt.step()
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict())
    for t in TASKS:
        with opt.task(t):
            model.loss(t, torch.full((5, 4), float("nan"))).backward()
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.optimizer.state_dict()["state"]
    for i, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(after[i][key]), torch.as_tensor(value)), (i, key)
    assert all(p.grad is None for p in model.parameters())
    d = opt.diagnostics()
    assert d["step_skipped"] == 1.0 and d["nonfinite/a"] == 1.0 and d["nonfinite/b"] == 1.0
    assert opt.num_steps == 2  # the step is counted, not taken


def test_skip_task_with_one_bad_task_still_steps_and_says_so():
    model = Net(4)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip_task")
    x = data(4)
    with opt.task("a"):
        model.loss("a", x["a"]).backward()
    with opt.task("b"):
        model.loss("b", torch.full((5, 4), float("inf"))).backward()
    before = model.heads["a"].weight.detach().clone()
    opt.step()
    assert not torch.equal(model.heads["a"].weight, before)
    assert opt.diagnostics()["step_skipped"] == 0.0


# ---------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mismatch_tol": float("nan")}, "mismatch_tol"),
        ({"mismatch_tol": -1e-3}, "mismatch_tol"),
        ({"mismatch_tol": float("inf")}, "mismatch_tol"),
        ({"mismatch_tol": 1.0}, "mismatch_tol"),
        ({"mismatch_tol": "0.1"}, "mismatch_tol"),
        ({"mismatch_tol": True}, "mismatch_tol"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"task_key": 3}, "task_key"),
        ({"on_step": "log.jsonl"}, "on_step"),
    ],
)
def test_constructor_rejects_bad_numbers_and_types(kwargs, match):
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        BalancedOptimizer(inner, **kwargs)
    # nothing was hooked: a backward is not captured by a half-built wrapper
    model.loss("a", data()["a"]).backward()


def test_constructor_accepts_valid_numbers():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mismatch_tol=0, seed=np.int64(7))
    assert opt.mismatch_tol == 0.0 and opt.seed == 7
    BalancedOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), mismatch_tol=0.5, seed=-3)


# ---------------------------------------------------------------------------------- item 15
def _closure(opt, model, x, counter, weights=None):
    def closure():
        counter[0] += 1
        opt.zero_grad()
        total = 0.0
        for t in TASKS:
            w = 1.0 if weights is None else weights[t]
            if isinstance(opt, BalancedOptimizer):
                with opt.task(t):
                    loss = model.loss(t, x[t])
                    loss.backward()
            else:
                loss = w * model.loss(t, x[t])
                loss.backward()
            total = total + loss.detach()
        return total

    return closure


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_sum_is_bit_identical_to_plain_lbfgs(line_search):
    plain, wrapped = Net(1), Net(1)
    kw = dict(lr=0.5, max_iter=6, history_size=4, line_search_fn=line_search)
    opt_plain = torch.optim.LBFGS(plain.parameters(), **kw)
    opt = BalancedOptimizer(torch.optim.LBFGS(wrapped.parameters(), **kw))
    n_plain, n_wrapped = [0], [0]
    for s in range(3):
        x = data(s)
        loss_plain = opt_plain.step(_closure(opt_plain, plain, x, n_plain))
        loss = opt.step(_closure(opt, wrapped, x, n_wrapped))
        assert torch.equal(loss_plain, loss)
        for p, q in zip(plain.parameters(), wrapped.parameters()):
            assert torch.equal(p, q)
    assert n_plain[0] == n_wrapped[0] > 3  # several evaluations per step
    assert opt.diagnostics()["closure_evaluations"] >= 2


def test_lbfgs_diagnostics_describe_the_starting_point():
    model = Net(2)
    x = data(2)
    ref = copy.deepcopy(model)
    expected = {}
    for t in TASKS:
        ref.zero_grad()
        ref.loss(t, x[t]).backward()
        expected[t] = flat(p.grad for p in ref.parameters() if p.grad is not None).norm().item()
    opt = BalancedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), method="normalize")
    count = [0]
    opt.step(_closure(opt, model, x, count))
    d = opt.diagnostics()
    assert count[0] > 1
    assert d["closure_evaluations"] == count[0]
    for t in TASKS:
        assert d[f"grad_norm/{t}"] == pytest.approx(expected[t], rel=1e-5)
        assert d[f"num_microbatches/{t}"] == 1.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), wa=st.floats(0.1, 4.0), wb=st.floats(0.1, 4.0))
@example(seed=195, wa=0.1015625, wb=0.125)
@example(seed=403, wa=0.234, wb=3.75)
def test_lbfgs_with_weights_equals_lbfgs_on_the_weighted_loss(seed, wa, wb):
    """Coefficients are decided at the first evaluation and kept for the step's later ones, so a
    fixed-weights correction is LBFGS on ``Σ w_t L_t`` (without line search, which would read the
    closure's unweighted loss).

    float64: Σ w_t ∇L_t and ∇(Σ w_t L_t) round differently, and LBFGS with large weights can diverge
    (parameters ×25 in 2 steps at seed=403, wb=3.75), which in float32 amplifies that rounding to
    6e-3; in float64 the two agree to ~1e-11 there, while a wrong coefficient moves them by ≫1e-3.
    """
    w = {"a": wa, "b": wb}
    plain, wrapped = Net(seed).double(), Net(seed).double()
    kw = dict(lr=0.3, max_iter=5, history_size=3, line_search_fn=None)
    opt_plain = torch.optim.LBFGS(plain.parameters(), **kw)
    opt = BalancedOptimizer(torch.optim.LBFGS(wrapped.parameters(), **kw), method="weights", weights=w)
    for s in range(2):
        x = {t: v.double() for t, v in data(seed * 7 + s).items()}
        opt_plain.step(_closure(opt_plain, plain, x, [0], weights=w))
        opt.step(_closure(opt, wrapped, x, [0]))
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-8)


def test_closure_method_runs_once_per_step():
    calls = []

    def halve_b(gram, ctx):
        calls.append(ctx.step)
        return torch.tensor([1.0 if t == "a" else 0.5 for t in ctx.tasks], dtype=torch.float64)

    model = Net(6)
    opt = BalancedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), method=halve_b)
    count = [0]
    opt.step(_closure(opt, model, data(6), count))
    opt.step(_closure(opt, model, data(7), count))
    assert count[0] > 2 and calls == [0, 1]


def test_sgd_closure_is_evaluated_once_and_corrected():
    """Guard: an optimizer that evaluates the closure once gets the wrapper's evaluation back."""
    model, ref = Net(7), Net(7)
    x = data(7)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="weights", weights={"a": 3.0, "b": 1.0})
    count = [0]
    opt.step(_closure(opt, model, x, count))
    assert count[0] == 1
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ref.step(_closure(opt_ref, ref, x, [0], weights={"a": 3.0, "b": 1.0}))
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)


def _nan_on_second_evaluation(opt, model, x, count):
    def closure():
        count[0] += 1
        opt.zero_grad()
        total = 0.0
        for t in TASKS:
            xt = torch.full_like(x[t], float("nan")) if (t == "b" and count[0] == 2) else x[t]
            with opt.task(t):
                loss = model.loss(t, xt)
                loss.backward()
            total = total + loss.detach()
        return total

    return closure


def test_lbfgs_nonfinite_at_a_later_evaluation_follows_the_policy():
    model = Net(11)
    x = data(11)
    opt = BalancedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), nonfinite="error")
    with pytest.raises(NonFiniteGradientError, match="'b'"):
        opt.step(_nan_on_second_evaluation(opt, model, x, [0]))
    model = Net(11)
    opt = BalancedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), nonfinite="skip_step")
    count = [0]
    opt.step(_nan_on_second_evaluation(opt, model, x, count))
    assert count[0] == 2  # a zero gradient ends LBFGS's step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.diagnostics()["closure_evaluations"] == 2
    assert "nonfinite/b" not in opt.diagnostics()  # the figures are the first evaluation's


# ---------------------------------------------------------------------------------- item 16
def _torch_optimizers() -> list[str]:
    return sorted(
        n
        for n, c in vars(torch.optim).items()
        if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    )


@pytest.mark.parametrize("name", _torch_optimizers())
def test_every_torch_optimizer_is_supported_or_refused_at_construction(name):
    """The rows of docs/optimizers.md (supported rows guard behaviour; SparseAdam and LBFGS failed)."""
    cls = getattr(torch.optim, name)
    plain, wrapped = Net(8, bias=False), Net(8, bias=False)  # 2-D weights only (Muon)
    if name == "SparseAdam":
        with pytest.raises(TypeError, match="SparseAdam.*docs/optimizers.md"):
            BalancedOptimizer(cls(wrapped.parameters()))
        return
    opt_plain, opt = cls(plain.parameters()), BalancedOptimizer(cls(wrapped.parameters()))
    for s in range(2):
        x = data(20 + s)
        for o, m in ((opt_plain, plain), (opt, wrapped)):
            if name == "LBFGS":
                o.step(_closure(o, m, x, [0]))
            else:  # the usual loop: backward(s), then step()
                _closure(o, m, x, [0])()
                o.step()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p, q), name
    other = Net(8, bias=False)
    corrected = BalancedOptimizer(cls(other.parameters()), method="normalize")
    corrected.step(_closure(corrected, other, data(30), [0]))
    assert corrected.diagnostics()["coef/a"] > 0


def test_optimizer_table_in_the_docs_lists_every_torch_optimizer():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "optimizers.md").read_text()
    for name in _torch_optimizers():
        assert f"`{name}`" in text, name


# ---------------------------------------------------------------------------------- item 18
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), method=st.sampled_from(["sum", "mean", "normalize", "pcgrad"]), clip=st.booleans())
def test_forgotten_zero_grad_is_named_as_the_cause(seed, method, clip):
    model = Net(seed)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method=method)
    x = data(seed)
    for t in TASKS:
        with opt.task(t):
            model.loss(t, x[t]).backward()
    if clip:  # the step left a clipped (and, for method != sum, corrected) gradient in p.grad
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5 * float(norm))
    opt.step()  # no zero_grad() after it
    with opt.task("a"):
        model.loss("a", data(seed + 1)["a"]).backward()
    with pytest.raises(GradientMismatchError, match=r"zero_grad\(\) was not called after the previous step"):
        opt.step()


def test_per_element_clipping_still_blames_clipping():
    model = Net(9)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    x = data(9)
    for t in TASKS:
        with opt.task(t):
            model.loss(t, x[t]).backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
    with pytest.raises(GradientMismatchError, match="clip_grad_value_") as err:
        opt.step()
    assert "was not called after the previous step" not in str(err.value)


def test_numpy_task_ids_and_labels_are_accepted():
    reg = TaskRegistry(["a", "b"])
    assert resolve_task({"task": np.int64(1)}, "task", reg) == "b"
    assert task_labels({"task": np.array([0, 1, 1])}, "task", reg) == ["a", "b", "b"]
    assert task_labels({"task": np.array(["a", "b"])}, "task", reg) == ["a", "b"]
    assert resolve_task({"task": np.str_("a")}, "task", reg) == "a"
    assert reg.name(np.int32(0)) == "a"
    with pytest.raises(TaskError, match="bool"):
        resolve_task({"task": np.bool_(True)}, "task", reg)
    with pytest.raises(TaskError, match="1.0"):
        resolve_task({"task": np.float64(1.0)}, "task", reg)
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"])
    with opt.task({"task": np.int64(0)}) as name:
        assert name == "a"


@pytest.mark.parametrize("tasks", ["math", b"math", {"a", "b"}])
def test_tasks_must_be_an_ordered_collection_of_names(tasks):
    with pytest.raises(TypeError, match="tasks"):
        TaskRegistry(tasks)
    with pytest.raises(TypeError, match="tasks"):
        BalancedOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), tasks=tasks)


def test_meta_device_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"meta.*to_empty"):
        BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1))


@pytest.mark.parametrize("tasks, error", [("math", TypeError), (["math", "total"], TaskError), (["a/b"], TaskError)])
def test_trainer_config_checks_the_task_list(tasks, error):
    pytest.importorskip("trl")
    from balancedmix.integrations.trl import BalancedConfig

    with pytest.raises(error, match="tasks|task name"):
        BalancedConfig(tasks=tasks)
    assert BalancedConfig(tasks=("a", "b")).tasks == ["a", "b"]


def test_a_step_without_backward_after_a_forgotten_zero_grad_names_it():
    model = Net(12)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    with opt.task("a"):
        model.loss("a", data(12)["a"]).backward()
    opt.step()
    with pytest.raises(GradientMismatchError, match=r"previous step's gradient \(zero_grad\(\) was not called"):
        opt.step()
    opt.zero_grad()
    opt.step()  # nothing captured, nothing in p.grad: a no-op step


def test_a_skipped_closure_step_does_not_call_the_inner_optimizer():
    model = Net(13)
    inner = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    opt = BalancedOptimizer(inner, nonfinite="skip_step")
    params = [p.detach().clone() for p in model.parameters()]
    count = [0]
    nan_x = {t: torch.full((5, 4), float("nan")) for t in TASKS}
    opt.step(_closure(opt, model, nan_x, count))
    assert count[0] == 1 and inner.state_dict()["state"] == {}  # LBFGS never ran (no func_evals, no history)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.diagnostics()["step_skipped"] == 1.0 and opt.diagnostics()["closure_evaluations"] == 1.0


def test_tasks_may_be_a_numpy_array_of_names():
    """``tasks=df["task"].unique()`` is a numpy array: its truth value is ambiguous, its items are numpy strings."""
    reg = TaskRegistry(np.array(["math", "code"], dtype=object))
    assert reg.names == ("math", "code") and all(type(n) is str for n in reg.names)
    reg = TaskRegistry(np.array(["math", "code"]))
    assert reg.names == ("math", "code") and all(type(n) is str for n in reg.names)


def test_loading_a_state_dict_with_other_tasks_leaves_everything_as_it_was():
    model = Net(14)
    opt = BalancedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), tasks=["a", "b"])
    with opt.task("a"):
        model.loss("a", data(14)["a"]).backward()
    opt.step()
    before = copy.deepcopy(opt.optimizer.state_dict())
    other = BalancedOptimizer(torch.optim.Adam(Net(15).parameters(), lr=0.5), tasks=["a", "c"])
    with pytest.raises(TaskError, match="differs from the declared tasks"):
        opt.load_state_dict(other.state_dict())
    after = opt.optimizer.state_dict()
    assert after["param_groups"][0]["lr"] == 0.1
    assert all(torch.equal(after["state"][i]["exp_avg"], before["state"][i]["exp_avg"]) for i in before["state"])
    assert opt.registry.names == ("a", "b")


def test_a_saved_task_list_with_a_reserved_name_is_refused_whole():
    reg = TaskRegistry()
    reg.index("x")
    with pytest.raises(TaskError, match="'total' is reserved"):
        reg.load_state_dict({"names": ["a", "total"], "declared": False})
    assert reg.names == ("x",)


def test_lbfgs_later_evaluations_are_corrected_with_the_first_coefficients():
    """p.grad after an LBFGS step is the last evaluation's corrected gradient: ``c_a G_a + 1 · G_b``
    for a task ``b`` that first appears after the first evaluation (documented: c = 1)."""
    model = Net(16)
    x = data(16)
    opt = BalancedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.2, max_iter=3), method="weights", weights={"a": 2.0, "b": 3.0}
    )
    count = [0]

    def closure():
        count[0] += 1
        opt.zero_grad()
        total = 0.0
        for t in TASKS if count[0] > 1 else ["a"]:
            with opt.task(t):
                loss = model.loss(t, x[t])
                loss.backward()
            total = total + loss.detach()
        return total

    opt.step(closure)
    assert count[0] == 3 and opt.diagnostics()["coef/a"] == 2.0 and "coef/b" not in opt.diagnostics()
    got = flat(p.grad for p in model.parameters())
    ref = copy.deepcopy(model)
    want = []
    for t, c in (("a", 2.0), ("b", 1.0)):
        ref.zero_grad(set_to_none=False)
        ref.loss(t, x[t]).backward()
        want.append(c * flat(torch.zeros_like(p) if p.grad is None else p.grad for p in ref.parameters()))
    torch.testing.assert_close(got, want[0] + want[1])


def test_a_task_index_names_the_task_block():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"])
    for index in (1, np.int64(1), torch.tensor(1), np.array([1])):
        with opt.task(index) as name:
            assert name == "b"
    with pytest.raises(TaskError, match="out of range"):
        with opt.task(np.int64(2)):
            pass
    with pytest.raises(TaskError, match="bool"):
        with opt.task(True):
            pass
