"""The sketch across processes: FSDP2 shards and DDP ranks sketch their own coordinates and sum.

Two gloo processes (tests/dist_harness.py). The single-process sketch of the whole vector is the
reference; the sum of the ranks' sketches must equal it up to float summation order.
"""

import contextlib
import math

import pytest
import torch

from balancedmix.sketch import CountSketch, global_starts, shard_offset
from balancedmix.storage import SketchStorage

from dist_harness import DistributedRunError, run_ranks

WORLD = 2
DIM = 64
SEED = 11
TASKS_DDP = ["a", "b", "c"]  # test_distributed's tasks


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 5-row and 7-row weights: uneven Shard(0) shards on 2 ranks; a bias of 7 and one of 3
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))


def reference_sketch() -> torch.Tensor:
    model = make_model()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    cs = CountSketch(DIM, SEED)
    return cs.sketch(flat, key=cs.key(3))


def _fsdp_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    starts = global_starts(params)
    store = SketchStorage([p.to_local() for p in params], dim=DIM, seed=SEED, dtype=torch.float64, starts=starts)
    store.period = 3
    store._key = store.sketcher.key(3)
    r = store.row("all")
    for i, p in enumerate(params):
        store.add(r, i, p.to_local().detach().double())
    local = store.data[r].clone()
    dist.all_reduce(store.data)
    return {"sum": store.data[r].clone(), "local": local, "offsets": [shard_offset(p) for p in params],
            "local_numel": sum(p.to_local().numel() for p in params)}


def _ddp_worker(rank: int, world: int) -> dict:
    """Each rank holds a disjoint random piece of every parameter's vector (zeros elsewhere)."""
    import torch.distributed as dist

    model = make_model()
    params = [p.detach().double() for p in model.parameters()]
    store = SketchStorage(params, dim=DIM, seed=SEED, dtype=torch.float64)
    store.period = 3
    store._key = store.sketcher.key(3)
    r = store.row("all")
    g = torch.Generator().manual_seed(5)  # same on both ranks: a common random partition
    for i, p in enumerate(params):
        owner = torch.randint(0, world, p.shape, generator=g)
        store.add(r, i, torch.where(owner == rank, p, torch.zeros_like(p)))
    dist.all_reduce(store.data)
    return {"sum": store.data[r].clone()}


@pytest.mark.slow
def test_fsdp2_shards_sketch_their_global_coordinates_and_sum_to_the_whole():
    want = reference_sketch()
    res = run_ranks(_fsdp_worker, WORLD, timeout=120)
    total = sum(p.numel() for p in make_model().parameters())
    assert res[0]["local_numel"] + res[1]["local_numel"] == total
    assert res[0]["offsets"] == [0] * 6
    assert res[1]["offsets"] == [3 * 4, 3, 4 * 5, 4, 2 * 7, 2]  # rank 1 holds rows 3.. / 4.. / 2..
    for r in res:
        torch.testing.assert_close(r["sum"], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(res[0]["local"], want)  # each rank alone has only part of it


@pytest.mark.slow
def test_ddp_ranks_with_disjoint_pieces_sum_to_the_single_process_sketch():
    want = reference_sketch()
    for r in run_ranks(_ddp_worker, WORLD, timeout=120):
        torch.testing.assert_close(r["sum"], want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the optimizer under DDP
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sum", "normalize"])
def test_ddp_sketch_mode_matches_the_single_process_sketch_mode(method):
    """One all-reduce of the K×d sketches: the same figures and, with lagged coefficients carried
    by DDP's own gradient all-reduce, the same parameters as one process on the global batch."""
    from test_distributed import STEPS, _ddp_worker, reference

    want_diags, want_params = reference(method, sketch_dim=DIM)
    results = run_ranks(_ddp_worker, WORLD, method, "ddp", None, {"sketch_dim": DIM}, timeout=120)
    for res in results:
        assert res["modes"] == ["ddp"] * STEPS
        _assert_same_run(res, want_diags, want_params)
        for got in res["diags"]:
            assert got["buffer_bytes"] == (len(TASKS_DDP) + 1 + 2) * DIM * 4  # K task rows, untagged row, 2d scratch


def _assert_same_run(res: dict, want_diags: list, want_params: list) -> None:
    """A rank's figures and final parameters equal the single-process run's."""
    from test_distributed import assert_params_equal

    for got, want in zip(res["diags"], want_diags):
        for k, v in want.items():
            if k.startswith(("grad_norm", "update_share", "coef", "cos", "grad_scale")):
                assert math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-7), (k, got[k], v)
    assert_params_equal(res["params"], want_params)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sync, estimator, clip", [("auto", "raw", None), ("buffers", "raw", None), ("buffers", "split", 0.05)]
)
def test_ddp_sketch_mode_with_every_micro_step_under_no_sync_matches_the_single_process(sync, estimator, clip):
    """No micro-step lets DDP sync (BalancedGRPOTrainer's way under DDP): synchronize() all-reduces
    p.grad itself (it carries the lagged coefficients) and the K×d sketches, giving the same
    figures and parameters as one process on the global batch — also with the split estimator
    and a clip after synchronize() (the trainer's order)."""
    from test_distributed import STEPS, _ddp_worker, reference

    want_diags, want_params = reference("normalize", clip=clip, sketch_dim=DIM, estimator=estimator)
    opts = {"sketch_dim": DIM, "sync": sync, "estimator": estimator}
    results = run_ranks(_ddp_worker, WORLD, "normalize", "buffers", clip, opts, timeout=120)
    for res in results:
        assert res["modes"] == ["buffers"] * STEPS
        _assert_same_run(res, want_diags, want_params)


def _local_change_worker(rank: int, world: int) -> dict:
    """Every micro-step under no_sync, then rank 1 halves one local gradient before step()."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from test_distributed import M, SCHEDULE, batch, loss_fn, make_model

    from balancedmix import BalancedOptimizer

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS_DDP, method="normalize",
                            sketch_dim=DIM)
    before = [p.detach().clone() for p in model.parameters()]
    for i, task in enumerate(SCHEDULE[rank]):
        with ddp.no_sync(), opt.task(task):
            (loss_fn(ddp, batch(0, rank, i, task)) / M).backward()
    if rank == 1:
        next(model.parameters()).grad.mul_(0.5)
    try:
        opt.step()
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
        return {"error": f"{type(exc).__name__}: {exc}", "unchanged": unchanged}
    return {"error": None}


@pytest.mark.slow
def test_ddp_sketch_mode_refuses_a_local_gradient_changed_before_synchronize():
    """The sketch-space check: p.grad that is not the rank's own Σ c_t G_t (a local clip, here a
    halved gradient on one rank) raises on every rank, parameters unchanged."""
    for res in run_ranks(_local_change_worker, WORLD, timeout=120):
        assert res["error"] is not None and "not this rank's local sum" in res["error"], res
        assert res["unchanged"]


@pytest.mark.slow
def test_ddp_measured_subset_refuses_micro_steps_that_never_sync():
    """measure= alone (exact rows of a subset) has nothing to rebuild p.grad from: every micro-step
    under no_sync raises on every rank."""
    from test_distributed import _ddp_worker

    with pytest.raises(DistributedRunError, match="measure= needs DDP"):
        run_ranks(_ddp_worker, WORLD, "normalize", "buffers", None, {"measure_first": True}, timeout=120)


def _fsdp_sketch_worker(rank: int, world: int, method: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from test_distributed import FSDP_SCHEDULE, STEPS, batch, loss_fn, make_model, params_of

    from balancedmix import BalancedOptimizer
    from balancedmix.distributed import FSDP2Sync

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS_DDP, method=method, sketch_dim=DIM)
    assert isinstance(opt.distributed, FSDP2Sync)
    diags = []
    m = len(FSDP_SCHEDULE)
    for step in range(STEPS):
        for i, task in enumerate(FSDP_SCHEDULE):
            with opt.task(task):
                (loss_fn(model, batch(step, rank, i, task)) / m).backward()
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sum", "normalize"])
def test_fsdp2_sketch_mode_matches_the_single_process_sketch_mode(method):
    """FSDP2 shards sketch their own global coordinates; the sketches (not their Gram) are summed
    in one collective of (rows + 1) × d values; the lagged coefficients scale each task block's
    increment of the local gradient shards. Same figures and parameters as one process."""
    from test_distributed import FSDP_SCHEDULE, WORLD as W, assert_params_equal, reference

    want_diags, want_params = reference(method, schedule={r: FSDP_SCHEDULE for r in range(W)}, sketch_dim=DIM)
    results = run_ranks(_fsdp_sketch_worker, WORLD, method, timeout=120)
    for res in results:
        for got, want in zip(res["diags"], want_diags):
            for k, v in want.items():
                if k.startswith(("grad_norm", "update_share", "coef", "cos", "grad_scale")):
                    assert math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-7), (k, got[k], v)
        assert_params_equal(res["params"], want_params)
    if method == "normalize":  # the lag was exercised: step 2 carries step 1's coefficients
        assert any(v != 1.0 for k, v in want_diags[1].items() if k.startswith("coef/"))


def _measure_run(rank: int | None, world: int) -> dict:
    """``measure=`` the last layer, ``normalize``: under DDP (rank given) or one process on the global batch."""
    from test_distributed import M, SCHEDULE, STEPS, batch, loss_fn, make_model, params_of

    from balancedmix import BalancedOptimizer

    model = make_model()
    net = model
    if rank is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS_DDP, method="normalize",
                            measure=list(model[2].parameters()))
    diags = []
    for step in range(STEPS):
        ranks = [rank] if rank is not None else list(range(world))
        for r in ranks:
            for i, task in enumerate(SCHEDULE[r]):
                last = i == M - 1
                ctx = net.no_sync() if rank is not None and not last else contextlib.nullcontext()
                with ctx, opt.task(task):
                    (loss_fn(net, batch(step, r, i, task)) / (M * (1 if rank is not None else world))).backward()
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": params_of(model)}


def _measure_worker(rank: int, world: int) -> dict:
    return _measure_run(rank, world)


@pytest.mark.slow
def test_ddp_measured_subset_matches_the_single_process_run():
    from test_distributed import assert_params_equal

    want = _measure_run(None, WORLD)
    for res in run_ranks(_measure_worker, WORLD, timeout=120):
        for got, exp in zip(res["diags"], want["diags"]):
            for k, v in exp.items():
                if k.startswith(("grad_norm", "update_share", "coef", "cos", "measured_numel")):
                    assert math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-7), (k, got[k], v)
        assert_params_equal(res["params"], want["params"])


# ----------------------------------------------------------------------------- BalancedGRPOTrainer under DDP
def _trainer_sketch_worker(rank: int, world: int, out: str, homogeneous: bool | str, fsdp: bool = False) -> dict:
    from pathlib import Path

    import test_quotas as tq
    import test_trl as tt

    kwargs: dict = {}
    if fsdp:
        import test_fsdp2 as tf

        tf._force_fsdp2_in_trainer()
        kwargs.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    trainer = tt.make_trainer(tq._recording_trainer_class(), tt.build_char_tokenizer(), Path(out), optim="sgd",
                              method="normalize", sketch_dim=DIM, homogeneous=homogeneous, log_dir=out + "/logs", **kwargs)
    trainer.train()
    opt = trainer.balanced_optimizer
    logged = [h for h in trainer.state.log_history if "split_microbatches" in h]
    return {
        "kind": opt.distributed.kind,
        "mode": opt.distributed.last_mode,
        "mixed": sum(len(t) > 1 for t in trainer.micro_tasks),
        "params": [_full(p) for p in trainer.model.parameters()],
        "keys": sorted({k for h in logged for k in h}),
        "shares": [sum(h.get(f"update_share/{t}", 0.0) for t in tt.TASKS) for h in logged],
        "coefs": [[h.get(f"coef/{t}") for t in tt.TASKS] for h in logged],
        "next": [[h.get(f"coef_next/{t}") for t in tt.TASKS] for h in logged],
    }


def _assert_lagged_sketch_run_agrees(res: list[dict]) -> None:
    """Both ranks of a trainer run in sketch mode: SE keys logged, shares summing to 1, each step
    applying the previous step's coef_next, the lag acting (a coefficient ≠ 1), and the same
    coefficients and bit-identical parameters on both ranks."""
    for r in res:
        assert any(k.startswith("grad_norm_se/") for k in r["keys"]) and "sketch_dim" in " ".join(r["keys"])
        assert all(abs(s - 1.0) < 1e-6 for s in r["shares"])
        for prev, cur in zip(r["next"], r["coefs"][1:]):  # the lag: step n+1 applies step n's coef_next
            for a, b in zip(prev, cur):
                if a is not None and b is not None:
                    assert math.isclose(a, b, rel_tol=1e-9), (prev, cur)
    assert res[0]["coefs"] == res[1]["coefs"]
    assert any(c is not None and c != 1.0 for step in res[0]["coefs"][1:] for c in step)  # the lag acted
    for a, b in zip(res[0]["params"], res[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (an FSDP2 DTensor is gathered)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


@pytest.mark.slow
@pytest.mark.distributed
def test_grpo_trainer_sketch_mode_under_fsdp2(tmp_path):
    """sketch_dim in BalancedGRPOTrainer under accelerate's FSDP2 plugin (2 gloo processes): each
    rank sketches its shards at their global coordinates, the lag scales each task block's
    increment, and the ranks end with the same parameters and logged figures."""
    res = run_ranks(_trainer_sketch_worker, WORLD, str(tmp_path), "auto", True, timeout=300)
    assert all(r["kind"] == "fsdp2" for r in res)
    _assert_lagged_sketch_run_agrees(res)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("homogeneous", ["auto", False], ids=["single-task", "mixed-split"])
def test_grpo_trainer_sketch_mode_under_ddp(tmp_path, homogeneous):
    """sketch_dim in BalancedGRPOTrainer on 2 gloo processes (every micro-step under no_sync, as the
    trainer runs DDP): synchronize() all-reduces p.grad and the sketches before the clip, the
    ranks end with the same parameters, the figures carry their standard errors, and each step
    applies the coefficients the previous one computed. Mixed micro-batches (split into one
    backward per task) work too."""
    res = run_ranks(_trainer_sketch_worker, WORLD, str(tmp_path), homogeneous, timeout=300)
    assert all(r["kind"] == "ddp" and r["mode"] == "buffers" for r in res)
    assert (res[0]["mixed"] > 0) == (homogeneous is False)
    _assert_lagged_sketch_run_agrees(res)
