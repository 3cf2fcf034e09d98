"""BalancedOptimizer core invariants (DESIGN.md 1, 2, 4, 6) and host-trainer facts."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix import BalancedOptimizer, GradientMismatchError, NonFiniteGradientError
from balancedmix.tasks import MixedTaskBatchError, UnknownTaskError

TASKS = ["a", "b", "c"]


class Net(torch.nn.Module):
    """Shared trunk, one head per task: a task never touches the other heads' parameters."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in TASKS})
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.to(dtype)

    def loss(self, task: str, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return (self.heads[task](self.trunk(x)).pow(2).mean() + 0.1 * self.trunk(x).sum()) * scale


def batches(seed: int, n: int, tasks=TASKS, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(len(tasks), (n,), generator=g).tolist()
    return [(tasks[i], torch.randn(4, 5, generator=g).to(dtype)) for i in order]


def flat_grads(model):
    """All trainable parameters' gradients, flattened (zeros where a parameter got none)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters() if p.requires_grad]
    )


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 4), micro=st.integers(1, 6), estimator=st.sampled_from(["raw", "split"]))
def test_sum_is_bit_identical_to_plain_optimizer(name, seed, steps, micro, estimator):
    plain, bal = Net(seed), Net(seed)
    opt_plain = OPTIMIZERS[name]([p for p in plain.parameters() if p.requires_grad])
    opt = BalancedOptimizer(OPTIMIZERS[name]([p for p in bal.parameters() if p.requires_grad]), estimator=estimator)
    for s in range(steps):
        for task, x in batches(seed * 31 + s, micro):
            plain.loss(task, x).backward()
            with opt.task(task):
                bal.loss(task, x).backward()
        opt_plain.step()
        opt.step()
        opt_plain.zero_grad()
        opt.zero_grad()
    for p, q in zip(plain.parameters(), bal.parameters()):
        assert torch.equal(p, q)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), micro=st.integers(1, 8), estimator=st.sampled_from(["raw", "split"]), untagged=st.booleans())
def test_attribution_is_exact(seed, micro, estimator, untagged):
    """Σ_t G_t (+ untagged) == accumulated p.grad, and each G_t == that task's separate gradient."""
    model = Net(seed)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), estimator=estimator)
    ref = {}
    data = batches(seed, micro)
    for task, x in data:
        single = copy.deepcopy(model)
        single.zero_grad()
        single.loss(task, x).backward()
        ref[task] = ref.get(task, 0) + flat_grads(single)
        with opt.task(task):
            model.loss(task, x).backward()
    if untagged:
        x = torch.randn(2, 5)
        single = copy.deepcopy(model)
        single.zero_grad()
        single.loss("a", x).backward()
        ref["untagged"] = flat_grads(single)
        model.loss("a", x).backward()
    captured = opt.captured_gradients()
    assert set(captured) == set(ref)
    for task, g in ref.items():
        torch.testing.assert_close(captured[task], g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(captured.values()), flat_grads(model), rtol=1e-5, atol=1e-6)


def test_diagnostics_match_direct_computation():
    model = Net(3)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, estimator="split")
    per_task = {t: [] for t in TASKS}
    plan = [("a", 0), ("b", 1), ("a", 2), ("a", 3), ("b", 4), ("a", 5)]  # c absent
    for task, seed in plan:
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed))
        single = copy.deepcopy(model)
        single.zero_grad()
        single.loss(task, x).backward()
        per_task[task].append(flat_grads(single).double())
        with opt.task(task):
            model.loss(task, x).backward()
    opt.step()
    d = opt.diagnostics()
    G = {t: sum(v) for t, v in per_task.items() if v}
    total = G["a"] + G["b"]
    for t in ("a", "b"):
        assert math.isclose(d[f"grad_norm/{t}"], float(G[t].norm()), rel_tol=1e-5)
        assert math.isclose(d[f"update_share/{t}"], float(G[t] @ total / (total @ total)), rel_tol=1e-5)
    cos = float(G["a"] @ G["b"] / (G["a"].norm() * G["b"].norm()))
    assert math.isclose(d["cos/a/b"], cos, rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(d["grad_norm/total"], float(total.norm()), rel_tol=1e-5)
    assert d["num_microbatches/a"] == 4 and d["num_microbatches/b"] == 2 and d["num_microbatches/c"] == 0
    assert "grad_norm/c" not in d and "update_share/c" not in d
    # split halves alternate micro-batches of a task: a -> [0, 2] and [1, 3] of its own sequence
    ga = per_task["a"]
    half_a, half_b = ga[0] + ga[2], ga[1] + ga[3]
    est = float(half_a @ half_b) * 16 / 4
    assert math.isclose(d["grad_sqnorm_unbiased/a"], est, rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(d["grad_norm_unbiased/a"], math.sqrt(max(est, 0)), rel_tol=1e-4, abs_tol=1e-6)
    # rows are allocated for the tasks seen so far: 2 tasks x 2 halves x P float32
    assert d["buffer_bytes"] == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) * 2 * 2


def test_split_needs_two_microbatches_for_unbiased_figures():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), estimator="split")
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.step()
    d = opt.diagnostics()
    assert "grad_norm/a" in d and "grad_norm_unbiased/a" not in d


def run_methods_step(method, clip=None, untagged=False, **kw):
    model = Net(7)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), method=method, **kw)
    G = {}
    for task, x in batches(11, 5, tasks=["a", "b"]):
        single = copy.deepcopy(model)
        single.zero_grad()
        single.loss(task, x).backward()
        G[task] = G.get(task, 0) + flat_grads(single).double()
        with opt.task(task):
            model.loss(task, x).backward()
    U = 0
    if untagged:
        single = copy.deepcopy(model)
        single.zero_grad()
        x = torch.ones(2, 5)
        single.loss("a", x, 0.5).backward()
        U = flat_grads(single).double()
        model.loss("a", x, 0.5).backward()
    scale = 1.0
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scale = min(1.0, clip / (float(norm) + 1e-6))
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).double()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).double()
    return G, U, scale, before - after, opt.diagnostics()


def test_mean_method_moves_params_by_scaled_mean():
    G, U, _, delta, d = run_methods_step("mean", untagged=True)
    torch.testing.assert_close(delta, 0.5 * (G["a"] + G["b"]) + U, rtol=1e-4, atol=1e-6)
    assert d["coef/a"] == 0.5 and "grad_norm/untagged" in d
    shares = [d["update_share/a"], d["update_share/b"], d["update_share/untagged"]]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)


def test_clip_before_step_is_detected_and_honoured():
    G, _, scale, delta, d = run_methods_step("mean", clip=0.05)
    assert scale < 1
    assert math.isclose(d["grad_scale"], scale, rel_tol=1e-4)
    torch.testing.assert_close(delta, scale * 0.5 * (G["a"] + G["b"]), rtol=1e-4, atol=1e-7)
    assert math.isclose(d["grad_norm/total"], float((G["a"] + G["b"]).norm()), rel_tol=1e-5)  # pre-clip


def test_weights_method_with_schedule():
    G, _, _, delta, d = run_methods_step("weights", weights=lambda step: {"a": 2.0, "b": 0.0})
    torch.testing.assert_close(delta, 2.0 * G["a"], rtol=1e-4, atol=1e-6)
    assert d["update_share/b"] == 0.0


def test_zero_gradient_task_is_defined():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    with opt.task("b"):
        model.loss("b", torch.randn(4, 5), scale=0.0).backward()
    opt.step()
    d = opt.diagnostics()
    assert d["grad_norm/b"] == 0 and d["cos/a/b"] == 0 and d["update_share/b"] == 0
    assert all(math.isfinite(v) for v in d.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _nan_step(policy):
    model = Net(5)
    opt = BalancedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), nonfinite=policy)
    # one clean step so Adam has state
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.step()
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict())
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    with opt.task("b"):
        model.loss("b", torch.full((4, 5), float("nan"))).backward()
    return model, opt, params, state


def test_nan_task_error_loses_nothing():
    model, opt, params, state = _nan_step("error")
    with pytest.raises(NonFiniteGradientError, match="'b'") as err:
        opt.step()
    assert err.value.tasks == ("b",)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert opt.optimizer.state_dict()["state"][0]["step"] == state["state"][0]["step"]
    # the run can go on
    opt.zero_grad()
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_task_skip_task_updates_with_the_others():
    model, opt, params, _ = _nan_step("skip_task")
    opt.step()
    assert opt.diagnostics()["nonfinite/b"] == 1.0
    assert "grad_norm/a" in opt.diagnostics()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(next(model.parameters()), params[0])
    # head b received only NaN: untouched (its gradient was dropped)
    assert torch.equal(model.heads["b"].weight, params[list(dict(model.named_parameters())).index("heads.b.weight")])


def test_nan_task_skip_step_changes_nothing():
    model, opt, params, _ = _nan_step("skip_step")
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_and_mixed_labels_fail_before_backward():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"])
    with pytest.raises(UnknownTaskError, match="'zzz'"):
        with opt.task({"task": ["zzz"] * 4}):
            pass
    with pytest.raises(MixedTaskBatchError):
        with opt.task({"task": ["a", "b"]}):
            pass
    assert opt.captured_gradients() == {}
    with pytest.raises(RuntimeError, match="nested"):
        with opt.task("a"):
            with opt.task("b"):
                pass


def test_mixed_loss_fallback_is_exact():
    model = Net(2)
    ref = copy.deepcopy(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    xa, xb = torch.randn(3, 5), torch.randn(2, 5)
    opt.backward({"a": model.loss("a", xa), "b": model.loss("b", xb)})
    (ref.loss("a", xa) + ref.loss("b", xb)).backward()
    torch.testing.assert_close(flat_grads(model), flat_grads(ref))
    cap = opt.captured_gradients()
    torch.testing.assert_close(cap["a"] + cap["b"], flat_grads(ref))
    assert opt._microbatches == {0: 1, 1: 1}


def test_model_zero_grad_mid_step_is_caught():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    model.zero_grad()  # the optimizer never hears of it
    with opt.task("b"):
        model.loss("b", torch.randn(4, 5)).backward()
    with pytest.raises(GradientMismatchError, match="uniform rescale"):
        opt.step()


def test_state_dict_round_trip_resumes_bit_identically():
    def train(model, opt, seeds):
        for s in seeds:
            for task, x in batches(s, 3):
                with opt.task(task):
                    model.loss(task, x).backward()
            opt.step()
            opt.zero_grad()

    m1 = Net(9)
    o1 = BalancedOptimizer(torch.optim.AdamW(m1.parameters(), lr=1e-2), method="mean", seed=4)
    train(m1, o1, [0, 1])
    saved_model = copy.deepcopy(m1.state_dict())
    saved_opt = copy.deepcopy(o1.state_dict())
    train(m1, o1, [2, 3])

    m2 = Net(123)
    m2.load_state_dict(saved_model)
    o2 = BalancedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-2), method="mean", seed=99)
    o2.load_state_dict(saved_opt)
    assert o2.num_steps == 2 and o2.registry.names == o1.registry.names
    assert torch.equal(o2.generator.get_state(), torch.Generator().manual_seed(4).get_state())
    train(m2, o2, [2, 3])
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_and_param_group_delegation():
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = BalancedOptimizer(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.5 and opt.param_groups is inner.param_groups
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra]})
    with opt.task("b"):
        (extra.sum() + model.loss("b", torch.randn(4, 5))).backward()
    assert opt.captured_gradients()["b"][-2:].tolist() == [1.0, 1.0]


def test_accelerate_prepare_single_process():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = Net(1)
    bal = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), method="mean")
    pmodel, popt = acc.prepare(model, bal)
    assert popt.optimizer is bal
    for task, x in batches(0, 4, tasks=["a", "b"]):
        with acc.accumulate(pmodel):
            with bal.task(task):
                acc.backward(pmodel.loss(task, x))
            popt.step()
            popt.zero_grad()
    assert bal.num_steps == 2
    assert bal.diagnostics()["num_microbatches/a"] + bal.diagnostics()["num_microbatches/b"] == 2
    AcceleratorState._reset_state(True)


def test_bf16_parameters():
    model = Net(0, dtype=torch.bfloat16)
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), method="mean")
    for task, x in batches(0, 4, dtype=torch.bfloat16):
        with opt.task(task):
            model.loss(task, x).backward()
    cap = opt.captured_gradients()
    assert all(v.dtype == torch.float32 for v in cap.values())
    opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_frozen_and_unused_parameters_are_skipped():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    assert all(p is not model.frozen.weight for p in opt._params)
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.step()
    assert model.heads["b"].weight.grad is None  # never touched: no gradient invented
    assert model.frozen.weight.grad is None


def test_wrapper_rejects_bad_arguments():
    p = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        BalancedOptimizer(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        BalancedOptimizer(torch.optim.SGD(p, lr=1), estimator="both")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        BalancedOptimizer(torch.optim.SGD(p, lr=1), method="nope")
    with pytest.raises(TypeError, match="pickled"):
        import pickle

        pickle.dumps(BalancedOptimizer(torch.optim.SGD(p, lr=1)))


def test_on_step_jsonl_logging(tmp_path):
    from balancedmix.logger import JSONLLogger, read_jsonl

    model = Net()
    with JSONLLogger(tmp_path / "m.jsonl") as log:
        opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), on_step=log)
        for s in range(3):
            for task, x in batches(s, 2):
                with opt.task(task):
                    model.loss(task, x).backward()
            opt.step()
            opt.zero_grad()
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("grad_norm/total" in r for r in rows)
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_float64_models_get_float64_buffers():
    model = Net(0, dtype=torch.float64)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    ref = copy.deepcopy(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    with opt.task("a"):
        model.loss("a", x).backward()
    ref.loss("a", x).backward()
    cap = opt.captured_gradients()["a"]
    assert cap.dtype == torch.float64
    assert torch.equal(cap, flat_grads(ref))  # exact: no float32 round trip
