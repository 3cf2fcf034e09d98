"""Distributed exactness: 2 CPU processes (gloo) against a single-process run on the same global batch.

Each test starts 2 ranks with ``tests/dist_harness.py`` (fork, ~0.1 s), a hard timeout that
fails the test, and a 30 s process-group timeout. References are computed in the pytest process
(which never creates a process group) by a single-process ``BalancedOptimizer`` fed the
concatenation of both ranks' micro-batches, each loss divided by the world size (DDP and FSDP2
average over ranks).

Tolerance: float32 gradients summed in a different order (per-rank buffers, then the ring
all-reduce) — rtol 1e-5 / atol 1e-6 on diagnostics, 1e-6 on parameters after 2 SGD steps.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from balancedmix import BalancedOptimizer, available_methods
from balancedmix.distributed import (
    DDPSync,
    DistributedStateError,
    SingleProcess,
    UnsupportedDistributedError,
    canonical_row_keys,
    detect,
    values_agree,
)
from balancedmix.tasks import TaskError, UnknownTaskError
from dist_harness import DistributedRunError, run_ranks

pytestmark = pytest.mark.distributed

TASKS = ["a", "b", "c"]
WORLD = 2
M = 4  # micro-batches per step per rank
STEPS = 2
# rank 0 never sees "c", rank 1 never sees "b"; both see "a"
SCHEDULE = {0: ["a", "a", "b", "a"], 1: ["c", "c", "a", "c"]}
TIMEOUT = 60.0
RTOL, ATOL = 1e-5, 1e-6


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step: int, rank: int, micro: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 100 * rank + micro)
    shift = {"a": 0.0, "b": 2.0, "c": -3.0}[task]  # tasks with different gradient scales
    x = torch.randn(4, 6, generator=g)
    y = torch.randn(4, 3, generator=g) * (1.0 + abs(shift)) + shift
    return x, y


def loss_fn(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


def reference(method: str, schedule: dict[int, list[str]] | None = None, clip: float | None = None, **opts) -> tuple[list[dict], list[torch.Tensor]]:
    """Single process, the global batch: every rank's micro-batches, each loss / world."""
    schedule = schedule or SCHEDULE
    model = make_model()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method, **opts)
    assert isinstance(opt.distributed, SingleProcess)
    diags = []
    for step in range(STEPS):
        for rank in range(WORLD):
            for i, task in enumerate(schedule[rank]):
                with opt.task(task) if task is not None else _null():
                    (loss_fn(model, batch(step, rank, i, task or "a")) / (len(schedule[rank]) * WORLD)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return diags, params_of(model)


COMPARED = ("grad_norm/", "update_share/", "coef/", "cos/", "num_microbatches/")
COMPARED_EXACT = ("grad_norm/total", "grad_norm/update", "grad_scale")


def assert_diag_equal(got: dict, want: dict) -> None:
    keys = [k for k in want if k.startswith(COMPARED) or k in COMPARED_EXACT]
    assert keys, "nothing to compare"
    for k in keys:
        assert k in got, f"missing diagnostic {k}"
        assert math.isclose(got[k], want[k], rel_tol=RTOL, abs_tol=ATOL), f"{k}: distributed {got[k]} vs single {want[k]}"
    extra = {k for k in got if k.startswith(COMPARED)} - set(keys)
    assert not extra, f"diagnostics only in the distributed run: {extra}"


def assert_params_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- DDP workers
def _ddp_worker(
    rank: int, world: int, method: str, mode: str, clip: float | None, opts: dict, schedule: dict | None = None
) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    if opts.pop("measure_first", False):  # measure= the first parameter only (a lagged, exact subset)
        opts["measure"] = [next(model.parameters())]
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method, sync=opts.pop("sync", "auto"), **opts)
    assert isinstance(opt.distributed, DDPSync)
    diags, modes = [], []
    schedule = schedule or SCHEDULE
    for step in range(STEPS):
        for i, task in enumerate(schedule[rank]):
            last = i == M - 1
            # "ddp": DDP syncs the last micro-step (accelerate's accumulate()); "buffers": never
            sync_now = mode == "ddp" and last
            ctx = ddp.no_sync() if not sync_now else _null()
            with ctx, (opt.task(task) if task is not None else _null()):
                (loss_fn(ddp, batch(step, rank, i, task or "a")) / M).backward()
        if clip is not None:
            opt.synchronize()  # global gradient in p.grad before clipping (needed with no_sync)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        modes.append(opt.distributed.last_mode)
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model), "modes": modes}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _methods() -> list[str]:
    return ["sum", "normalize", "pcgrad"]


def _require(method: str) -> None:
    if method not in available_methods():
        pytest.skip(f"method {method!r} not registered yet")


@pytest.mark.parametrize("method", _methods())
@pytest.mark.parametrize("mode", ["ddp", "buffers"])
def test_ddp_matches_single_process(method: str, mode: str) -> None:
    _require(method)
    want_diags, want_params = reference(method)
    results = run_ranks(_ddp_worker, WORLD, method, mode, None, {}, timeout=TIMEOUT)
    for res in results:
        assert res["modes"] == [mode] * STEPS  # sync="auto" recognised how p.grad was synchronised
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
    # diagnostics identical on every rank (bitwise: computed from the same reduced numbers)
    assert results[0]["diags"] == results[1]["diags"]


@pytest.mark.parametrize("mode", ["ddp", "buffers"])
def test_ddp_untagged_and_absent_task(mode: str) -> None:
    """An untagged backward on one rank, task "b" absent everywhere (a zero row inside the reduced span)."""
    method = "pcgrad" if "pcgrad" in available_methods() else "mean"
    schedule = {0: ["a", None, "a", "a"], 1: ["c", "c", "a", "c"]}
    want_diags, want_params = reference(method, schedule=schedule)
    assert "grad_norm/untagged" in want_diags[0] and "grad_norm/b" not in want_diags[0]
    results = run_ranks(_ddp_worker, WORLD, method, mode, None, {}, schedule, timeout=TIMEOUT)
    for res in results:
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
    assert results[0]["diags"] == results[1]["diags"]


@pytest.mark.parametrize("sync", ["ddp", "buffers"])
def test_ddp_explicit_sync_and_clip(sync: str) -> None:
    """Declared sync modes, a split estimator and a clip applied to the global gradient."""
    want_diags, want_params = reference("normalize" if "normalize" in available_methods() else "mean", clip=0.05, estimator="split")
    method = "normalize" if "normalize" in available_methods() else "mean"
    results = run_ranks(_ddp_worker, WORLD, method, sync, 0.05, {"sync": sync, "estimator": "split"}, timeout=TIMEOUT)
    for res in results:
        for got, want in zip(res["diags"], want_diags):
            assert got["grad_scale"] < 1.0  # the clip was active and detected
            assert_diag_equal(got, want)
            # halves alternate across ranks: per-half counts are global, estimates are defined
            assert "grad_norm_unbiased/a" in got
        assert_params_equal(res["params"], want_params)
    assert results[0]["diags"] == results[1]["diags"]


def test_ddp_comm_bytes_and_buffer_layout() -> None:
    results = run_ranks(_ddp_worker, WORLD, "sum", "buffers", None, {}, timeout=TIMEOUT)
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    rows = len(canonical_row_keys(len(TASKS), "raw"))  # a, b, c, untagged
    meta = 1 + 2 * rows + len(list(model.parameters())) + 2 * WORLD + 1 + 2  # + the overlap hook's flags
    for res in results:
        d = res["diags"][-1]
        # the buffer collective covers the rows used on some rank: a, b, c (untagged unused)
        assert d["comm_bytes"] == (rows - 1) * n_params * 4 + meta * 8
        assert d["buffer_bytes"] == rows * n_params * 4


# ----------------------------------------------------------------------------- collective errors
def _unknown_task_worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    before = params_of(model)
    schedule = ["a", "b", "zzz", "a"] if rank == 1 else ["a", "b", "c", "a"]
    for i, task in enumerate(schedule):
        with opt.task({"task": task}):
            (loss_fn(ddp, batch(0, rank, i, "a")) / M).backward()
    try:
        opt.step()
    except UnknownTaskError as exc:
        error = str(exc)
    else:
        error = None
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    # the run can go on: the next step works on every rank
    opt.zero_grad()
    for i, task in enumerate(SCHEDULE[rank]):
        with opt.task(task):
            (loss_fn(ddp, batch(1, rank, i, task)) / M).backward()
    opt.step()
    return {"error": error, "unchanged": unchanged, "next": opt.diagnostics()}


def test_undeclared_task_raises_on_every_rank() -> None:
    r0, r1 = run_ranks(_unknown_task_worker, WORLD, timeout=TIMEOUT)
    assert r0["error"] is not None and r0["error"] == r1["error"]
    assert "rank 1" in r0["error"] and "'zzz'" in r0["error"] and "rank 0" not in r0["error"]
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["next"] == r1["next"] and r0["next"]["num_microbatches/a"] == 4.0


def _undeclared_registry_worker(rank: int, world: int) -> str:
    model = make_model()
    try:
        BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    except TaskError as exc:
        return str(exc)
    return "no error"


def test_distributed_requires_declared_tasks() -> None:
    msgs = run_ranks(_undeclared_registry_worker, WORLD, timeout=TIMEOUT)
    assert msgs[0] == msgs[1] and "declared" in msgs[0]


def _wrong_sync_worker(rank: int, world: int) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, sync="ddp")
    for i, task in enumerate(SCHEDULE[rank]):
        with ddp.no_sync(), opt.task(task):
            (loss_fn(ddp, batch(0, rank, i, task)) / M).backward()
    try:
        opt.step()
    except DistributedStateError as exc:
        return str(exc)
    return "no error"


def test_declared_ddp_sync_without_ddp_sync_raises_everywhere() -> None:
    msgs = run_ranks(_wrong_sync_worker, WORLD, timeout=TIMEOUT)
    assert msgs[0] == msgs[1] and "no_sync" in msgs[0]


def _local_clip_worker(rank: int, world: int) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    for i, task in enumerate(SCHEDULE[rank]):
        with ddp.no_sync(), opt.task(task):
            (loss_fn(ddp, batch(0, rank, i, task)) / M).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # clips LOCAL gradients: wrong
    try:
        opt.step()
    except DistributedStateError as exc:
        return str(exc)
    return "no error"


def test_clip_of_local_gradients_is_caught_on_every_rank() -> None:
    msgs = run_ranks(_local_clip_worker, WORLD, timeout=TIMEOUT)
    assert msgs[0] == msgs[1] and "synchronize" in msgs[0]


def _hang_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(3))  # rank 1 never joins


def test_harness_fails_on_hang() -> None:
    with pytest.raises(DistributedRunError, match="without a result"):
        run_ranks(_hang_worker, WORLD, timeout=3.0, pg_timeout=60.0)


# ----------------------------------------------------------------------------- FSDP2
FSDP_SCHEDULE = ["a", "b", "a", "c"]  # identical on every rank (FSDP2 averages each micro-step)


def _fsdp_worker(rank: int, world: int, method: str, bad_schedule: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from balancedmix.distributed import FSDP2Sync

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method)
    assert isinstance(opt.distributed, FSDP2Sync)
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    diags = []
    for step in range(STEPS):
        schedule = list(FSDP_SCHEDULE)
        if bad_schedule and rank == 1:
            schedule[1] = "c"
        for i, task in enumerate(schedule):
            with opt.task(task):
                (loss_fn(model, batch(step, rank, i, task)) / M).backward()
        try:
            opt.step()
        except DistributedStateError as exc:
            return {"error": str(exc)}
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model), "local_numel": local_numel}


@pytest.mark.parametrize("method", _methods())
def test_fsdp2_matches_single_process(method: str) -> None:
    _require(method)
    want_diags, want_params = reference(method, schedule={r: FSDP_SCHEDULE for r in range(WORLD)})
    results = run_ranks(_fsdp_worker, WORLD, method, False, timeout=TIMEOUT)
    total = sum(p.numel() for p in make_model().parameters())
    assert results[0]["local_numel"] + results[1]["local_numel"] == total
    assert results[0]["local_numel"] != results[1]["local_numel"]  # uneven shards (5 rows on 2 ranks)
    for res in results:
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
    assert results[0]["diags"] == results[1]["diags"]


def test_fsdp2_different_schedules_raise_on_every_rank() -> None:
    r0, r1 = run_ranks(_fsdp_worker, WORLD, "sum", True, timeout=TIMEOUT)
    assert "error" in r0 and r0["error"] == r1["error"] and "same task" in r0["error"]


# ----------------------------------------------------------------------------- FSDP2 + split estimator
# every task twice per rank (an even count: the global halves of the concatenated reference —
# rank 0's micro-batches, then rank 1's — are then the same sets as FSDP2's, where micro-step i
# holds the mean of both ranks' micro-batch i and goes to one half as a whole)
FSDP_SPLIT_SCHEDULE = ["a", "b", "a", "c", "b", "c"]
SPLIT_KEYS = ("grad_sqnorm_unbiased/", "grad_norm_unbiased/", "noise_trace/", "noise_scale/")


def assert_split_equal(got: dict, want: dict, tasks: list[str]) -> None:
    for task in tasks:
        for prefix in SPLIT_KEYS:
            k = prefix + task
            assert k in want, f"reference lacks {k}"
            assert k in got, f"missing diagnostic {k}"
            assert math.isclose(got[k], want[k], rel_tol=RTOL, abs_tol=ATOL), f"{k}: distributed {got[k]} vs single {want[k]}"
    extra = {k for k in got if k.startswith(SPLIT_KEYS)} - {k for k in want if k.startswith(SPLIT_KEYS)}
    assert not extra, f"split diagnostics only in the distributed run: {extra}"


def _fsdp_split_worker(rank: int, world: int, method: str, schedule: list[str]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from balancedmix.distributed import FSDP2Sync

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method, estimator="split")
    assert isinstance(opt.distributed, FSDP2Sync)
    diags = []
    for step in range(STEPS):
        for i, task in enumerate(schedule):
            with opt.task(task):
                (loss_fn(model, batch(step, rank, i, task)) / len(schedule)).backward()
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model)}


@pytest.mark.parametrize("method", ["sum", "normalize"])
def test_fsdp2_split_estimator_matches_single_process(method: str) -> None:
    """FSDP2 with estimator="split": unbiased norms, noise traces and parameters equal the global-batch run."""
    _require(method)
    schedule = {r: FSDP_SPLIT_SCHEDULE for r in range(WORLD)}
    want_diags, want_params = reference(method, schedule=schedule, estimator="split")
    results = run_ranks(_fsdp_split_worker, WORLD, method, FSDP_SPLIT_SCHEDULE, timeout=TIMEOUT)
    for res in results:
        for got, want in zip(res["diags"], want_diags):
            assert got["num_microbatches/a"] == 2 * WORLD
            assert_diag_equal(got, want)
            assert_split_equal(got, want, TASKS)
        assert_params_equal(res["params"], want_params)
    assert results[0]["diags"] == results[1]["diags"]


# ----------------------------------------------------------------------------- mixed-task batches: opt.backward({task: loss})
# each micro-batch mixes two tasks in one forward; rank 0 mixes a+b, rank 1 a+c under DDP
MIXED_M = 2


def mixed_losses(model: nn.Module, step: int, rank: int, micro: int, tasks: list[str], scale: float) -> dict[str, torch.Tensor]:
    """One forward over the concatenated rows of ``tasks``, split into per-task losses (each × scale)."""
    parts = [batch(step, rank, micro, t) for t in tasks]
    x = torch.cat([p[0] for p in parts])
    out = model(x)
    losses, row = {}, 0
    for t, (xt, yt) in zip(tasks, parts):
        losses[t] = ((out[row : row + len(xt)] - yt) ** 2).mean() * scale
        row += len(xt)
    return losses


def mixed_reference(method: str, mix: dict[int, list[str]]) -> tuple[list[dict], list[torch.Tensor]]:
    model = make_model()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, method=method)
    diags = []
    for step in range(STEPS):
        for rank in range(WORLD):
            for i in range(MIXED_M):
                opt.backward(mixed_losses(model, step, rank, i, mix[rank], 1.0 / (MIXED_M * WORLD)))
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return diags, params_of(model)


def _mixed_worker(rank: int, world: int, method: str, kind: str, mix: dict[int, list[str]], sync: str = "auto") -> dict:
    base = make_model()
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(base[0], mesh=mesh)
        fully_shard(base[2], mesh=mesh)
        fully_shard(base, mesh=mesh)
        model = base
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(base)
    opt = BalancedOptimizer(torch.optim.SGD(base.parameters(), lr=0.1), tasks=TASKS, method=method, sync=sync)
    diags = []
    for step in range(STEPS):
        for i in range(MIXED_M):
            last = i == MIXED_M - 1
            # DDP "buffers": every micro-step under no_sync; "ddp": DDP syncs the last one
            ctx = model.no_sync() if kind == "ddp-buffers" or (kind == "ddp" and not last) else _null()
            with ctx:
                opt.backward(mixed_losses(model, step, rank, i, mix[rank], 1.0 / MIXED_M))
        try:
            opt.step()
        except DistributedStateError as exc:
            return {"error": str(exc)}
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(base), "mode": opt.distributed.last_mode}


@pytest.mark.parametrize("kind", ["ddp-buffers", "fsdp2"])
def test_mixed_loss_backward_matches_single_process(kind: str) -> None:
    """The mixed-batch fallback gives the single-process per-task figures and update under DDP and FSDP2."""
    method = "normalize" if "normalize" in available_methods() else "mean"
    # FSDP2 reduce-scatters every backward: every rank passes the same tasks in the same order
    mix = {0: ["a", "b"], 1: ["a", "b"]} if kind == "fsdp2" else {0: ["a", "b"], 1: ["c", "a"]}
    want_diags, want_params = mixed_reference(method, mix)
    results = run_ranks(_mixed_worker, WORLD, method, kind, mix, timeout=TIMEOUT)
    for res in results:
        assert res["mode"] == ("fsdp2" if kind == "fsdp2" else "buffers")
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
    assert results[0]["diags"] == results[1]["diags"]


@pytest.mark.parametrize("sync", ["auto", "ddp"])
def test_mixed_loss_backward_with_ddp_sync_on_raises_on_every_rank(sync: str) -> None:
    """DDP all-reduces only the first backward over a forward: a synced mixed-loss micro-step is refused clearly."""
    mix = {0: ["a", "b"], 1: ["c", "a"]}
    r0, r1 = run_ranks(_mixed_worker, WORLD, "sum", "ddp", mix, sync, timeout=TIMEOUT)
    assert "error" in r0 and r0["error"] == r1["error"]
    assert "opt.backward" in r0["error"] and "no_sync" in r0["error"]


# ----------------------------------------------------------------------------- pure helpers
@given(st.lists(st.integers(0, 2**20 - 1), min_size=1, max_size=64))
def test_values_agree_iff_all_equal(xs: list[int]) -> None:
    # the documented domain: values < 2**20 (hashes mod 1,000,003, lengths), so Σx² is exact in float64
    total = float(sum(xs))
    total_sq = float(sum(x * x for x in xs))
    assert values_agree(total, total_sq, len(xs)) == (len(set(xs)) == 1)


@given(st.integers(1, 6), st.sampled_from(["raw", "split"]))
def test_canonical_rows_cover_every_task_and_half_once(k: int, estimator: str) -> None:
    keys = canonical_row_keys(k, estimator)
    halves = 2 if estimator == "split" else 1
    assert len(keys) == len(set(keys)) == k * halves + 1
    assert keys[-1] == ("untagged",)
    assert [key[1] for key in keys[:-1]] == sorted(key[1] for key in keys[:-1])  # registry order


# ----------------------------------------------------------------------------- detection (single process)
def test_single_process_detection_and_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    assert isinstance(detect(list(model.parameters()), None), SingleProcess)
    with pytest.raises(ValueError, match="sync must be"):
        detect(list(model.parameters()), None, sync="nope")
    # built for DeepSpeed (accelerate's flag, ZeRO-3 parameters): usable only once attached to the engine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"])
    assert opt.distributed.kind == "deepspeed-pending"
    with pytest.raises(UnsupportedDistributedError, match="attach"):
        with opt.task("a"):
            pass
    assert not opt._in_context and not opt._microbatches  # the refused block left nothing behind
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    p = next(model.parameters())
    p.ds_id = 3  # what ZeRO-3 attaches to its parameters
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"])
    with pytest.raises(UnsupportedDistributedError, match="ZeRO-3.*attach"):
        opt.step()


# ----------------------------------------------------------------------------- the documented example
ROOT = Path(__file__).resolve().parents[1]


def _doc_command() -> str:
    text = (ROOT / "docs" / "distributed.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if "examples/accelerate_ddp.py" in ln and "torchrun" in ln]
    assert lines, "docs/distributed.md has no torchrun command for examples/accelerate_ddp.py"
    return lines[0]


def _doc_command_argv(port: int) -> tuple[list[str], dict[str, str]]:
    """The documented ``VAR=x torchrun ...`` line as an argv run by this interpreter.

    ``torchrun`` becomes ``sys.executable -m torch.distributed.run`` (the same launcher, found
    without the environment's ``bin/`` on ``PATH``); leading ``VAR=value`` words become env vars.
    """
    words = shlex.split(_doc_command())
    env: dict[str, str] = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words and words[0] == "torchrun", f"unexpected documented command: {_doc_command()!r}"
    argv = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(port), *words[1:]]
    return argv, env


@pytest.mark.slow
def test_accelerate_ddp_example_runs_with_documented_command(tmp_path: Path) -> None:
    from dist_harness import free_port

    argv, doc_env = _doc_command_argv(free_port())
    out = tmp_path / "diag.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **doc_env}
    # no launcher script on PATH: the run must not depend on an activated environment
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "torchrun").exists())
    proc = subprocess.run(
        [*argv, "--steps", "3", "--jsonl", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    import json

    assert out.exists(), f"no log written (rc {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    # logging happens on the main process only: one line per step
    assert len(records) == 3, proc.stderr
    for rec in records:
        assert rec["grad_norm/add"] > 0 and rec["grad_norm/rev"] > 0
        assert math.isclose(rec["update_share/add"] + rec["update_share/rev"], 1.0, abs_tol=1e-5)
    assert "ranks agree" in proc.stdout, proc.stdout + proc.stderr
