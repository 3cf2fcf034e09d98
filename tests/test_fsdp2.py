"""The wrapper follows its optimizer's parameters (issue 12 item 1, issue 14 items 8 and 19).

Single-process tests first: a parameter swapped in the optimizer's groups (what accelerate's
``fsdp2_switch_optimizer_parameters`` does), a parameter unfrozen after construction, a group
added in the middle of a step, a second wrapper on the same parameters. Then accelerate's FSDP2
plugin with 2 gloo processes (the private-state switch from ``shared/notes/scale-engines.md``
is confined to :func:`_accelerator_fsdp2`).
"""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix import BalancedOptimizer
from balancedmix.optimizer import ParametersChangedError

TASKS = ["a", "b"]


class Net(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(6, 2)

    def loss(self, task: str, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.tanh(self.trunk(x)))
        return (out[:, 0] if task == "a" else 3.0 * out[:, 1]).pow(2).mean()


def xs(seed: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))


def run_step(model: Net, opt: BalancedOptimizer, seed: int) -> dict[str, float]:
    for i, task in enumerate(["a", "b", "a"]):
        with opt.task(task):
            model.loss(task, xs(seed + i)).backward()
    opt.step()
    opt.zero_grad()
    return opt.diagnostics()


def reference(seed_model: int, steps: list[int], method: str, frozen_first: bool = False) -> tuple[list[dict], Net]:
    """A fresh wrapper built on exactly the parameters that train, one per phase."""
    model = Net(seed_model)
    diags = []
    for k, seed in enumerate(steps):
        opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method)
        diags.append(run_step(model, opt, seed))
        opt.remove_hooks()
    return diags, model


# ----------------------------------------------------------------------------- swapped parameters
def swap_params(opt: torch.optim.Optimizer, model: Net) -> None:
    """What accelerate does under FSDP2: new parameter objects in the module and in param_groups."""
    mapping = {}
    for name, mod in (("trunk", model.trunk), ("head", model.head)):
        for pname in ("weight", "bias"):
            old = getattr(mod, pname)
            new = torch.nn.Parameter(old.detach().clone())
            mapping[id(old)] = new
            setattr(mod, pname, new)
    for group in opt.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]


@pytest.mark.parametrize("method", ["sum", "normalize"])
def test_swapped_parameters_are_followed(method: str) -> None:
    """Today: hooks stay on the stale tensors; no per-task diagnostic and no correction, silently."""
    model = Net(0)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method)
    swap_params(opt, model)
    got = [run_step(model, opt, 10), run_step(model, opt, 20)]
    want, ref_model = reference(0, [10], method)
    # the second step of the reference continues on the same model with a fresh wrapper
    opt2 = BalancedOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.1), tasks=TASKS, method=method)
    want.append(run_step(ref_model, opt2, 20))
    for g, w in zip(got, want):
        for key in ("grad_norm/a", "grad_norm/b", "update_share/a", "coef/b", "grad_norm/update"):
            assert key in g, f"missing {key}: the wrapper did not follow the swapped parameters"
            assert math.isclose(g[key], w[key], rel_tol=1e-6), key
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(any(p is q for q in model.parameters()) for p in opt._params)


def test_swap_after_backward_raises_before_anything_is_lost() -> None:
    model = Net(0)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method="normalize")
    with opt.task("a"):
        model.loss("a", xs(0)).backward()
    swap_params(opt, model)
    with opt.task("b"):
        model.loss("b", xs(1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ParametersChangedError, match="param_groups"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert opt.num_steps == 0
    # the run goes on once the step's gradients are dropped, on the new parameters
    opt.zero_grad()
    diag = run_step(model, opt, 5)
    assert diag["grad_norm/a"] > 0 and diag["grad_norm/b"] > 0


# ----------------------------------------------------------------------------- staged unfreezing (issue 14 item 8)
@pytest.mark.parametrize("method", ["sum", "normalize"])
def test_parameter_unfrozen_between_steps_is_hooked(method: str) -> None:
    model = Net(0)
    model.trunk.requires_grad_(False)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method)
    run_step(model, opt, 10)
    model.trunk.requires_grad_(True)
    got = run_step(model, opt, 20)
    assert len(opt._params) == 4
    # reference: a wrapper built with the trunk trainable, on the same state after step 1
    ref = Net(0)
    ref.trunk.requires_grad_(False)
    o1 = BalancedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), tasks=TASKS, method=method)
    run_step(ref, o1, 10)
    o1.remove_hooks()
    ref.trunk.requires_grad_(True)
    o2 = BalancedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), tasks=TASKS, method=method)
    want = run_step(ref, o2, 20)
    for key in ("grad_norm/a", "grad_norm/b", "cos/a/b", "grad_norm/total", "grad_norm/update", "buffer_bytes"):
        assert math.isclose(got[key], want[key], rel_tol=1e-6), key
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_parameter_unfrozen_mid_step_raises() -> None:
    model = Net(0)
    model.trunk.requires_grad_(False)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method="normalize")
    with opt.task("a"):
        model.loss("a", xs(0)).backward()
    model.trunk.requires_grad_(True)
    with opt.task("b"):
        model.loss("b", xs(1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ParametersChangedError, match="requires_grad"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_add_param_group_mid_step_leaves_the_optimizer_unchanged() -> None:
    model = Net(0)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    with opt.task("a"):
        model.loss("a", xs(0)).backward()
    extra = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ParametersChangedError, match="add_param_group"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1 and len(opt.optimizer.param_groups) == 1
    opt.step()  # the step goes on unharmed
    opt.zero_grad()
    opt.add_param_group({"params": [extra]})  # between steps: hooked
    with opt.task("b"):
        (extra.sum() * 2 + model.loss("b", xs(1))).backward()
    assert opt.captured_gradients()["b"][-3:].tolist() == [2.0, 2.0, 2.0]


def test_group_added_to_the_inner_optimizer_is_hooked() -> None:
    model = Net(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = BalancedOptimizer(inner, tasks=TASKS, method="normalize")
    extra = torch.nn.Parameter(torch.ones(3))
    inner.add_param_group({"params": [extra]})  # behind the wrapper's back
    with opt.task("b"):
        (extra.sum() + model.loss("b", xs(1))).backward()
    assert opt.captured_gradients()["b"][-3:].tolist() == [1.0, 1.0, 1.0]
    opt.step()


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.sampled_from(["none", "freeze", "unfreeze", "swap"]), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_any_change_between_steps_keeps_attribution_exact_and_sum_identical(ops: list[str], seed: int) -> None:
    """Whatever happens to the parameters between steps, the next step's captured task gradients sum to
    p.grad over exactly the trainable parameters, and method="sum" stays bit-identical to the plain optimizer."""
    plain, model = Net(seed), Net(seed)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), tasks=TASKS)
    for k, op in enumerate(ops):
        for net, o in ((plain, opt_plain), (model, opt)):
            if op == "freeze":
                net.trunk.requires_grad_(False)
            elif op == "unfreeze":
                net.trunk.requires_grad_(True)
            elif op == "swap":
                swap_params(o, net)
        for i, task in enumerate(["a", "b", "a"]):
            plain.loss(task, xs(seed + 10 * k + i)).backward()
            with opt.task(task):
                model.loss(task, xs(seed + 10 * k + i)).backward()
        captured = sum(opt.captured_gradients().values())
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert [id(p) for p in opt._params] == [id(p) for p in trainable]
        total = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainable])
        torch.testing.assert_close(captured, total, rtol=1e-6, atol=1e-7)
        opt_plain.step()
        opt.step()
        opt_plain.zero_grad()
        opt.zero_grad()
        for p, q in zip(plain.parameters(), model.parameters()):
            assert torch.equal(p, q)


# ----------------------------------------------------------------------------- a second wrapper (issue 14 item 19)
def _n_hooks(p: torch.Tensor) -> int:
    return len(p._backward_hooks or {})


def test_rebuilding_the_wrapper_replaces_the_old_one() -> None:
    model = Net(0)
    refs = []
    for _ in range(5):
        opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
        refs.append(weakref.ref(opt))
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True, True, False]
    assert all(_n_hooks(p) == 1 for p in model.parameters())
    diag = run_step(model, opt, 0)
    assert diag["num_microbatches/a"] == 2


def test_a_replaced_wrapper_refuses_to_work() -> None:
    model = Net(0)
    old = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    new = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    assert all(_n_hooks(p) == 1 for p in model.parameters())
    with pytest.raises(ParametersChangedError, match="newer BalancedOptimizer"):
        with old.task("a"):
            pass
    with pytest.raises(ParametersChangedError, match="newer BalancedOptimizer"):
        old.step()
    diag = run_step(model, new, 0)
    assert diag["grad_norm/a"] > 0


def test_a_replaced_wrapper_cannot_take_the_parameters_back() -> None:
    model = Net(0)
    old = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    new = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    with pytest.raises(ParametersChangedError, match="newer BalancedOptimizer"):
        old.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert len(old.param_groups) == 1
    assert run_step(model, new, 0)["grad_norm/b"] > 0


def test_after_remove_hooks_a_new_wrapper_takes_over_quietly(caplog: pytest.LogCaptureFixture) -> None:
    model = Net(0)
    old = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    old.remove_hooks()
    with caplog.at_level("WARNING", logger="balancedmix.optimizer"):
        new = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    assert not [r for r in caplog.records if "replaced" in r.getMessage()]
    assert all(_n_hooks(p) == 1 for p in model.parameters())
    assert run_step(model, new, 0)["grad_norm/a"] > 0


def test_wrappers_on_disjoint_parameters_coexist() -> None:
    model = Net(0)
    o1 = BalancedOptimizer(torch.optim.SGD(model.trunk.parameters(), lr=0.1), tasks=TASKS)
    o2 = BalancedOptimizer(torch.optim.SGD(model.head.parameters(), lr=0.1), tasks=TASKS)
    with o1.task("a"), o2.task("a"):
        model.loss("a", xs(0)).backward()
    o1.step()
    o2.step()
    assert o1.diagnostics()["grad_norm/a"] > 0 and o2.diagnostics()["grad_norm/a"] > 0


def test_dropping_the_wrapper_removes_its_hooks() -> None:
    model = Net(0)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert all(_n_hooks(p) == 0 for p in model.parameters())


# ----------------------------------------------------------------------------- accelerate's FSDP2 plugin, 2 gloo processes
# Helpers and the single-process reference are shared with tests/test_distributed.py: the same model,
# batches and 4 micro-batches per rank with the same task schedule on both ranks (FSDP2 averages the
# ranks at every micro-step). Tolerance rtol 1e-5 / atol 1e-6 on diagnostics and parameters: float32
# gradients summed in another order (the reduce-scatter's mean of two ranks vs one process summing
# both ranks' micro-batches); `sum` is compared bit for bit with the same loop without balancedmix.
import importlib.util  # noqa: E402

import test_distributed as td  # noqa: E402
from dist_harness import run_ranks  # noqa: E402

if importlib.util.find_spec("accelerate") is not None:
    import accelerate  # noqa: F401,E402 - imported in the pytest process so the forked ranks inherit it
if importlib.util.find_spec("trl") is not None:
    import test_trl  # noqa: F401,E402 - the same for trl/transformers (seconds per rank otherwise)


def _accelerator_fsdp2(**kwargs):
    """``Accelerator`` with the FSDP2 plugin, forced on CPU. TESTS ONLY: three private writes.

    accelerate drops the FSDP plugin when the process type is MULTI_CPU (shared/notes/scale-engines.md);
    after these writes ``prepare`` takes the code path GPUs take (DTensor ``Shard(0)`` parameters,
    ``fsdp2_switch_optimizer_parameters``). Fragile to accelerate upgrades by design.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    # the ranks are forked from the pytest process: accelerate's singletons may hold an earlier test's
    # state (a GradientState without sync_each_batch ignores the new plugin), so start from scratch
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin, **kwargs)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def _accelerate_fsdp2_worker(rank: int, world: int, method: str, accumulate: bool, sync_each_batch: bool = False) -> dict:
    from accelerate.utils import GradientAccumulationPlugin

    from balancedmix.distributed import DistributedStateError

    if accumulate:
        acc = _accelerator_fsdp2(
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=td.M, sync_each_batch=sync_each_batch)
        )
    else:
        acc = _accelerator_fsdp2()
    # the plain engine run: the same loop without balancedmix
    plain_base = td.make_model()
    plain_model, plain_opt = acc.prepare(plain_base, torch.optim.SGD(plain_base.parameters(), lr=0.1))
    model = td.make_model()
    bal = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=td.TASKS, method=method)
    built_as = bal.distributed.kind  # optimizer built before prepare, as the HF Trainer does
    pmodel, popt = acc.prepare(model, bal)
    diags = []
    for step in range(td.STEPS):
        for i, task in enumerate(td.FSDP_SCHEDULE):
            xy = td.batch(step, rank, i, task)
            if accumulate:  # the usual accelerate loop: no reduce-scatter before the last micro-step (unless sync_each_batch)
                with acc.accumulate(pmodel), bal.task(task):
                    acc.backward(td.loss_fn(pmodel, xy))  # accelerate divides by num_steps
            else:  # FSDP2 synced at every micro-step
                with bal.task(task):
                    acc.backward(td.loss_fn(pmodel, xy) / td.M)
                acc.backward(td.loss_fn(plain_model, xy) / td.M)
        try:
            popt.step()
        except DistributedStateError as exc:
            return {"error": str(exc), "built_as": built_as}
        popt.zero_grad()
        plain_opt.step()
        plain_opt.zero_grad()
        diags.append(bal.diagnostics())
    return {
        "diags": diags,
        "params": td.params_of(pmodel),
        "plain": td.params_of(plain_model),
        "built_as": built_as,
        "kind": bal.distributed.kind,
        "dtensor": all(hasattr(p, "to_local") for p in bal._params),
        "local_numel": sum(p.to_local().numel() for p in bal._params),
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["sum", "normalize", "pcgrad"])
def test_accelerate_fsdp2_plain_loop(method: str) -> None:
    """Optimizer built before ``accelerator.prepare(model, opt)``: today the hooks stay on the unsharded
    tensors and the run trains without diagnostics or correction, silently."""
    pytest.importorskip("accelerate")
    results = run_ranks(_accelerate_fsdp2_worker, td.WORLD, method, False, timeout=td.TIMEOUT)
    want_diags, want_params = td.reference(method, schedule={r: td.FSDP_SCHEDULE for r in range(td.WORLD)})
    for res in results:
        assert res["built_as"] == "ddp" and res["kind"] == "fsdp2" and res["dtensor"]
        for got, want in zip(res["diags"], want_diags):
            td.assert_diag_equal(got, want)
        td.assert_params_equal(res["params"], want_params)
        if method == "sum":
            for p, q in zip(res["params"], res["plain"]):
                assert torch.equal(p, q)  # bit-identical to the plain FSDP2 run
        # the per-rank costs stated in docs/distributed.md: buffers of the local shard, P-independent collectives
        rows = len(td.TASKS) + 1
        last = res["diags"][-1]
        assert last["buffer_bytes"] == rows * max(r["local_numel"] for r in results) * 4
        assert last["comm_bytes"] == 8 * (rows * rows + 3 * rows + td.WORLD + 7)
    assert results[0]["local_numel"] + results[1]["local_numel"] == sum(p.numel() for p in td.make_model().parameters())
    assert results[0]["diags"] == results[1]["diags"]


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_fsdp2_accumulate_with_sync_each_batch() -> None:
    """``accelerator.accumulate()`` with ``GradientAccumulationPlugin(sync_each_batch=True)`` (the documented way to keep
    accelerate's accumulation under FSDP2) equals the single-process run."""
    pytest.importorskip("accelerate")
    results = run_ranks(_accelerate_fsdp2_worker, td.WORLD, "normalize", True, True, timeout=td.TIMEOUT)
    want_diags, want_params = td.reference("normalize", schedule={r: td.FSDP_SCHEDULE for r in range(td.WORLD)})
    for res in results:
        assert "error" not in res, res.get("error")
        for got, want in zip(res["diags"], want_diags):
            td.assert_diag_equal(got, want)
        td.assert_params_equal(res["params"], want_params)


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_fsdp2_accumulate_without_sync_is_refused() -> None:
    """``accelerator.accumulate()`` turns FSDP2's reduce-scatter off on non-final micro-steps: every
    gradient would reach p.grad in the last task's block. Refused on every rank, nothing updated."""
    pytest.importorskip("accelerate")
    r0, r1 = run_ranks(_accelerate_fsdp2_worker, td.WORLD, "sum", True, timeout=td.TIMEOUT)
    assert "error" in r0 and r0["error"] == r1["error"]
    assert "sync_each_batch" in r0["error"]


# ----------------------------------------------------------------------------- BalancedGRPOTrainer, GRPOConfig(fsdp=..., fsdp_version 2)
def _force_fsdp2_in_trainer() -> None:
    """TESTS ONLY: make the HF Trainer's ``Accelerator(fsdp_plugin=...)`` really use FSDP2 on CPU (see
    :func:`_accelerator_fsdp2`). Called in the forked rank processes, never in the pytest process."""
    import os

    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = Accelerator.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` exports
        if plugin is not None:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = plugin

    Accelerator.__init__ = init


def _trl_fsdp2_worker(rank: int, world: int, balanced: bool, method: str, out: str, overrides: dict, fsdp: bool = True) -> dict:
    import test_trl as tt
    from trl import GRPOTrainer

    from balancedmix.integrations.trl import BalancedGRPOTrainer

    tok = tt.build_char_tokenizer()
    kwargs = dict(overrides)
    if fsdp:
        _force_fsdp2_in_trainer()
        kwargs.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    if balanced:
        kwargs.update(method=method, log_dir=out + "/logs")
    init = [p.detach().clone() for p in tt.build_tiny_causal_lm(tok, hidden_size=32, num_layers=2, seed=0).parameters()]
    trainer = tt.make_trainer(BalancedGRPOTrainer if balanced else GRPOTrainer, tok, Path(out), **kwargs)
    trainer.train()
    params = td.params_of(trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model)
    moved = float(sum((p - q).abs().sum() for p, q in zip(params, init)))
    opt = getattr(trainer, "balanced_optimizer", None)
    return {
        "params": params,
        "moved": moved,
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        "metrics": trainer.last_balanced_metrics if balanced else None,
        "kind": opt.distributed.kind if opt is not None else None,
        "history": [{k: v for k, v in h.items() if k.startswith(("grad_norm", "update_share", "num_microbatches", "coef", "split_microbatches"))} for h in trainer.state.log_history],
    }


def _run_trl(tmp_path: Path, balanced: bool, method: str = "sum", fsdp: bool = True, **overrides) -> list[dict]:
    # SGD: Adam's g/sqrt(v) would amplify the float32 rounding differences between the two runs
    overrides = dict(optim="sgd", **overrides)
    return run_ranks(_trl_fsdp2_worker, td.WORLD, balanced, method, str(tmp_path), overrides, fsdp, timeout=240)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("rows", [8, 4], ids=["mixed-microbatches", "one-group-microbatches"])
def test_grpo_trainer_fsdp2_sum_matches_plain_trainer(tmp_path: Path, rows: int) -> None:
    """Today: the trainer treats the run as DDP and puts every micro-step under no_sync, which under FSDP2
    switches the reduce-scatter off: grad_norm 0, parameters never change, exit code 0.

    Now: the run trains like plain ``GRPOTrainer`` on the same batches. Not bit for bit: balancedmix makes
    FSDP2 reduce-scatter every micro-step (the plain Trainer defers it to the last one) and splits a
    micro-batch mixing tasks into per-task backwards, so float32 sums run in another order — atol 1e-6
    on parameters after 3 SGD steps (values ~0.1–1). Mixed micro-batches differ across ranks here
    (2 prompts of random tasks per micro-batch), which exercises the rank-aligned task blocks; with one
    GRPO group per micro-batch each is single-task but the ranks' tasks differ at a micro-step."""
    pytest.importorskip("trl")
    plain = _run_trl(tmp_path / "plain", balanced=False, per_device_train_batch_size=rows)
    bal = _run_trl(tmp_path / "bal", balanced=True, per_device_train_batch_size=rows)
    for res in bal:
        assert all(g > 0 for g in res["grad_norms"]) and res["moved"] > 0, (res["grad_norms"], res["moved"])
        assert res["kind"] == "fsdp2"
        for p, q in zip(res["params"], plain[0]["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        # attribution is complete: the tasks' summed gradient has the norm the Trainer clipped and logged
        steps = [h for h in res["history"] if "grad_norm/total" in h]
        assert len(steps) == 3
        for h in steps:
            assert math.isclose(h["grad_norm/total"], h["grad_norm"], rel_tol=1e-5)
            present = [t for t in ("add", "copy", "rev") if f"grad_norm/{t}" in h]
            assert present and math.isclose(sum(h[f"update_share/{t}"] for t in present), 1.0, abs_tol=1e-6)
    assert bal[0]["history"] == bal[1]["history"]
    assert all(torch.equal(p, q) for p, q in zip(bal[0]["params"], bal[1]["params"]))
    # the case is covered: some micro-batches mixed tasks (split, with zero-weight blocks where a task was absent)
    assert sum(h.get("split_microbatches", 0) for h in bal[0]["history"]) > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["normalize", "pcgrad"])
def test_grpo_trainer_fsdp2_corrects(tmp_path: Path, method: str) -> None:
    """The correction runs under FSDP2 through the Trainer: ranks agree on every figure and parameter,
    the coefficients are not all 1, the attribution is complete (see the ``sum`` test), and every per-task
    figure and parameter equals the same run under DDP (the DDP engine's figures and update equal a single
    process on the global batch: tests/test_distributed.py). Tolerance rtol 1e-4 on
    figures, atol 1e-6 on parameters: float32 reductions in another order (reduce-scatter per block vs one
    all-reduce of the buffers), and generation through the sharded model."""
    pytest.importorskip("trl")
    res = _run_trl(tmp_path, balanced=True, method=method)
    ddp = _run_trl(tmp_path / "ddp", balanced=True, method=method, fsdp=False)
    assert ddp[0]["kind"] == "ddp"
    got_steps = [h for h in res[0]["history"] if "grad_norm/total" in h]
    want_steps = [h for h in ddp[0]["history"] if "grad_norm/total" in h]
    assert len(got_steps) == len(want_steps) == 3
    for got, want in zip(got_steps, want_steps):
        keys = [k for k in want if k.startswith(("grad_norm/", "update_share/", "coef/"))]
        assert keys and set(keys) == {k for k in got if k.startswith(("grad_norm/", "update_share/", "coef/"))}
        for k in keys:
            assert math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=1e-6), (k, got[k], want[k])
    for p, q in zip(res[0]["params"], ddp[0]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert res[0]["history"] == res[1]["history"]
    assert all(torch.equal(p, q) for p, q in zip(res[0]["params"], res[1]["params"]))
    steps = [h for h in res[0]["history"] if "grad_norm/total" in h]
    assert len(steps) == 3 and res[0]["moved"] > 0
    for h in steps:
        assert math.isclose(h["grad_norm/total"], h["grad_norm"], rel_tol=1e-5)
    assert any(h[k] != 1.0 for h in steps for k in h if k.startswith("coef/"))


def _yaml_example_worker(rank: int, world: int, env: dict, argv: list[str]) -> dict:
    import contextlib
    import importlib.util
    import io
    import os

    os.environ.update(env)
    _force_fsdp2_in_trainer()
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("grpo_multitask", root / "examples" / "grpo_multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        last = module.main(argv)
    return {"stdout": out.getvalue(), "last": last}


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_fsdp2_yaml_example(tmp_path: Path) -> None:
    """``examples/accelerate_fsdp2.yaml`` + ``examples/grpo_multitask.py --gpu``: the environment
    ``accelerate launch`` derives from the file, in 2 gloo processes (on CPU, with the test-only switch)."""
    pytest.importorskip("trl")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    root = Path(__file__).resolve().parents[1]
    argv = ["--gpu", "--steps", "2", "--hidden-size", "32", "--prompts-per-step", "2", "--num-generations", "4",
            "--gradient-accumulation-steps", "2", "--max-completion-length", "4", "--output-dir", str(tmp_path)]  # fmt: skip
    args = launch_command_parser().parse_args(
        ["--config_file", str(root / "examples" / "accelerate_fsdp2.yaml"), str(root / "examples" / "grpo_multitask.py"), *argv]
    )
    args, _, _ = _validate_launch_command(args)
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    assert env["FSDP_VERSION"] == "2" and env["ACCELERATE_USE_FSDP"] == "true"
    env["ACCELERATE_USE_CPU"] = "1"  # no GPU here: gloo on CPU, FSDP2 forced by the test-only switch
    r0, r1 = run_ranks(_yaml_example_worker, td.WORLD, env, argv, timeout=240)
    assert "ranks agree" in r0["stdout"]
    same = {k: v for k, v in r0["last"].items() if k != "step_time"}
    assert same == {k: v for k, v in r1["last"].items() if k != "step_time"} and same["grad_norm/total"] > 0
    # FSDP2, not DDP: balancedmix's collectives are a few hundred bytes (DDP would all-reduce K x P floats)
    assert 0 < same["comm_bytes"] < 2_000
