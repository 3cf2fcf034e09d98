"""DDP with the task rows reduced inside DDP's bucketed all-reduce (``distributed/ddp_overlap.py``).

Two CPU processes (gloo). Each rank runs its own task order (rank 0 never sees "c", rank 1 never
sees "b"), so a reduction that paired rows by local use, or in a rank-dependent order, gives
per-task gradients that differ from the single-process reference on the same global batch.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancedmix import BalancedOptimizer, available_methods
from balancedmix.distributed import DDPSync, DistributedStateError, canonical_row_keys
from dist_harness import run_ranks
from test_distributed import (
    M,
    SCHEDULE,
    STEPS,
    TASKS,
    TIMEOUT,
    WORLD,
    _null,
    assert_diag_equal,
    assert_params_equal,
    batch,
    loss_fn,
    make_model,
    params_of,
    reference,
)

pytestmark = pytest.mark.distributed


def _overlap_worker(rank: int, world: int, method: str, opts: dict, plan: str = "last", schedule: dict | None = None,
                    clip: float | None = None) -> dict:
    """``plan``: which micro-steps DDP syncs — "last" (accelerate's accumulate()), "none" (all no_sync),
    "every" (no no_sync at all), "late" (the last synced, then one more under no_sync)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from balancedmix.distributed import ddp_overlap

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method, **opts)
    assert isinstance(opt.distributed, DDPSync)
    ddp_overlap.attach(ddp, opt)
    schedule = schedule or SCHEDULE
    diags, modes, grads, errors = [], [], [], []
    for step in range(STEPS):
        tasks = list(schedule[rank]) + (["a"] if plan == "late" else [])
        for i, task in enumerate(tasks):
            sync_now = {"last": i == M - 1, "none": False, "every": True, "late": i == M - 1}[plan]
            ctx = _null() if sync_now else ddp.no_sync()
            with ctx, (opt.task(task) if task is not None else _null()):
                (loss_fn(ddp, batch(step, rank, i % M, task or "a")) / M).backward()
        before = params_of(model)
        try:
            opt.synchronize()
            grads.append({k: v.clone() for k, v in opt.captured_gradients().items()})
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        except DistributedStateError as exc:
            errors.append(str(exc))
            assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
            opt.zero_grad()
            continue
        modes.append(opt.distributed.last_mode)
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model), "modes": modes, "grads": grads, "errors": errors}


def _reference_grads(schedule: dict) -> list[dict[str, torch.Tensor]]:
    """Per-task gradients of the global batch (single process, the same losses ÷ world)."""
    model = make_model()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method="sum")
    out = []
    for step in range(STEPS):
        for rank in range(WORLD):
            for i, task in enumerate(schedule[rank]):
                with opt.task(task):
                    (loss_fn(model, batch(step, rank, i, task)) / (M * WORLD)).backward()
        out.append({k: v.clone() for k, v in opt.captured_gradients().items()})
        opt.step()
        opt.zero_grad()
    return out


def _methods() -> list[str]:
    return [m for m in ("sum", "normalize", "pcgrad") if m in available_methods()]


@pytest.mark.parametrize("method", _methods())
def test_overlap_matches_single_process(method: str) -> None:
    want_diags, want_params = reference(method)
    results = run_ranks(_overlap_worker, WORLD, method, {}, timeout=TIMEOUT)
    for res in results:
        assert res["errors"] == []
        assert res["modes"] == ["overlap"] * STEPS
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
    assert results[0]["diags"] == results[1]["diags"]


def test_overlap_reduces_the_right_rows() -> None:
    """Every task's captured gradient equals the reference's: a hook that reduced rows out of order,
    used a rank-dependent layout, kept local rows or mixed buckets would fail here (the tasks have
    gradient scales 1, 3 and 4, and each rank misses one task)."""
    want = _reference_grads(SCHEDULE)
    results = run_ranks(_overlap_worker, WORLD, "sum", {"sync": "ddp"}, timeout=TIMEOUT)
    for res in results:
        assert res["modes"] == ["overlap"] * STEPS
        for got, ref in zip(res["grads"], want):
            assert sorted(got) == sorted(ref) == TASKS
            for task in TASKS:
                torch.testing.assert_close(got[task], ref[task], rtol=1e-5, atol=1e-7, msg=f"task {task}")
    for a, b in zip(results[0]["grads"], results[1]["grads"]):
        for task in TASKS:
            assert torch.equal(a[task], b[task])


def test_overlap_split_estimator_and_clip() -> None:
    method = "normalize" if "normalize" in available_methods() else "mean"
    want_diags, want_params = reference(method, clip=0.05, estimator="split")
    results = run_ranks(_overlap_worker, WORLD, method, {"estimator": "split"}, "last", None, 0.05, timeout=TIMEOUT)
    for res in results:
        assert res["modes"] == ["overlap"] * STEPS
        for got, want in zip(res["diags"], want_diags):
            assert got["grad_scale"] < 1.0  # the clip of the reduced p.grad was detected
            assert_diag_equal(got, want)
            assert "grad_norm_unbiased/a" in got
        assert_params_equal(res["params"], want_params)


def test_overlap_comm_bytes() -> None:
    """Bytes per step: the T task rows (not the untagged row) instead of DDP's P + the used rows."""
    results = run_ranks(_overlap_worker, WORLD, "sum", {}, timeout=TIMEOUT)
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    rows = len(canonical_row_keys(len(TASKS), "raw"))
    meta = 1 + 2 * rows + len(list(model.parameters())) + 2 * WORLD + 1 + 2
    for res in results:
        assert res["diags"][-1]["comm_bytes"] == (rows - 1) * n_params * 4 + meta * 8


def test_overlap_without_sync_takes_the_buffers_path() -> None:
    """Every micro-step under no_sync: the hook never runs; sync='auto' rebuilds p.grad as usual."""
    want_diags, want_params = reference("sum")
    results = run_ranks(_overlap_worker, WORLD, "sum", {}, "none", timeout=TIMEOUT)
    for res in results:
        assert res["modes"] == ["buffers"] * STEPS
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)


@pytest.mark.parametrize("plan", ["every", "late"])
def test_overlap_wrong_sync_plan_raises_on_every_rank(plan: str) -> None:
    results = run_ranks(_overlap_worker, WORLD, "sum", {}, plan, timeout=TIMEOUT)
    for res in results:
        assert len(res["errors"]) == STEPS and res["modes"] == []
        assert "exactly one micro-step" in res["errors"][0]
    assert results[0]["errors"] == results[1]["errors"]


def test_overlap_untagged_gradient_raises_on_every_rank() -> None:
    schedule = {0: ["a", None, "a", "a"], 1: ["c", "c", "a", "c"]}
    results = run_ranks(_overlap_worker, WORLD, "sum", {}, "last", schedule, timeout=TIMEOUT)
    for res in results:
        assert len(res["errors"]) == STEPS and "untagged" in res["errors"][0]
    assert results[0]["errors"] == results[1]["errors"]


def _discard_worker(rank: int, world: int) -> dict:
    """A step's gradients dropped by zero_grad() after the synced backward: the next step is exact."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from balancedmix.distributed import ddp_overlap

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    ddp_overlap.attach(ddp, opt)
    for i, task in enumerate(SCHEDULE[1 - rank]):  # a discarded step with the other rank's schedule
        with (_null() if i == M - 1 else ddp.no_sync()), opt.task(task):
            (loss_fn(ddp, batch(7, rank, i, task)) / M).backward()
    opt.zero_grad()
    diags = []
    for step in range(STEPS):
        for i, task in enumerate(SCHEDULE[rank]):
            with (_null() if i == M - 1 else ddp.no_sync()), opt.task(task):
                (loss_fn(ddp, batch(step, rank, i, task)) / M).backward()
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model), "mode": opt.distributed.last_mode}


def test_overlap_state_of_a_discarded_step_is_ignored() -> None:
    want_diags, want_params = reference("sum")
    for res in run_ranks(_discard_worker, WORLD, timeout=TIMEOUT):
        assert res["mode"] == "overlap"
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)


def _attach_refusals_worker(rank: int, world: int) -> list[str]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from balancedmix.distributed import ddp_overlap

    out = []
    model = make_model()
    ddp = DDP(model)
    for build in (
        lambda: (ddp, BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, sync="buffers")),
        lambda: (model, BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)),
        lambda: (ddp, BalancedOptimizer(torch.optim.SGD(list(model.parameters())[:2], lr=0.1), tasks=TASKS)),
        lambda: (ddp, BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, sketch_dim=64)),
    ):
        try:
            ddp_overlap.attach(*build())
        except (TypeError, ValueError) as exc:
            out.append(type(exc).__name__ + ": " + str(exc))
        else:
            out.append("no error")
    return out


def test_attach_refusals() -> None:
    msgs = run_ranks(_attach_refusals_worker, WORLD, timeout=TIMEOUT)[0]
    assert msgs[0].startswith("ValueError") and "sync='buffers'" in msgs[0]
    assert msgs[1].startswith("TypeError") and "DistributedDataParallel" in msgs[1]
    assert msgs[2].startswith("ValueError") and "exactly the DDP module's trainable parameters" in msgs[2]
    assert msgs[3].startswith("ValueError") and "sketch_dim" in msgs[3]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(TASKS), min_size=M, max_size=M), min_size=WORLD, max_size=WORLD),
       st.sampled_from(["raw", "split"]))
def test_overlap_any_per_rank_schedule_matches_single_process(schedules: list[list[str]], estimator: str) -> None:
    """Random task orders per rank (tasks absent on one rank or everywhere, repeated, interleaved):
    the per-task gradients and the update equal the single-process run on the same global batch."""
    schedule = dict(enumerate(schedules))
    want_grads = _reference_grads(schedule)
    want_diags, want_params = reference("sum", schedule=schedule, estimator=estimator)
    results = run_ranks(_overlap_worker, WORLD, "sum", {"estimator": estimator}, "last", schedule, timeout=TIMEOUT)
    for res in results:
        assert res["errors"] == [] and res["modes"] == ["overlap"] * STEPS
        for got, ref in zip(res["grads"], want_grads):
            assert sorted(got) == sorted(ref)
            for task in ref:
                torch.testing.assert_close(got[task], ref[task], rtol=1e-5, atol=1e-7)
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
