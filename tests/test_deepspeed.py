"""DeepSpeed ZeRO-1/2: 2 CPU processes (gloo) against the plain engine and a single-process run.

Each test starts 2 ranks with ``tests/dist_harness.py`` (fork); each rank builds several engines in
turn (``deepspeed.initialize`` reuses the harness's gloo group), so one 2-process run covers the
plain engine and several methods. References are computed in the pytest process, which never
creates a process group: a single-process ``BalancedOptimizer`` (no DeepSpeed) fed both ranks'
micro-batches, each loss divided by ``GA * world`` (DeepSpeed divides by the accumulation steps
and averages the ranks).

Tolerances: ``method="sum"`` is compared bitwise with the plain engine (balancedmix writes back
the same values); against the single-process run, diagnostics match to rtol 1e-5 / atol 1e-6 (float32 gradients
summed in a different order: per-rank, then DeepSpeed's reduce), parameters after 2 AdamW steps to
1e-5 (AdamW divides by ``sqrt(v) + eps``, ``eps = 1e-3`` here so that an element whose gradient is
~0 cannot turn a 1e-8 summation difference into an O(lr) update difference).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'balancedmix[deepspeed]' with DS_BUILD_OPS=0)")

from balancedmix import BalancedOptimizer, available_methods  # noqa: E402
from balancedmix.distributed import DistributedStateError, SingleProcess, UnsupportedDistributedError  # noqa: E402
from dist_harness import run_ranks  # noqa: E402
from test_distributed import batch, loss_fn, make_model  # noqa: E402 - the same tiny MLP and batches as the DDP/FSDP2 tests

pytestmark = pytest.mark.distributed

TASKS = ["a", "b", "c"]
WORLD = 2
GA = 3  # micro-steps per optimizer step (DeepSpeed's gradient_accumulation_steps)
STEPS = 2
LR, EPS = 0.05, 1e-3
TIMEOUT = 120.0
RTOL, ATOL = 1e-5, 1e-6
# ZeRO-2 reduces every micro-step: the same task on every rank at each micro-step
ALIGNED = {0: ["a", "b", "a"], 1: ["a", "b", "a"]}
# ZeRO-1 captures local gradients: ranks may differ ("b" only on rank 0, "c" only on rank 1)
UNALIGNED = {0: ["a", "a", "b"], 1: ["c", "c", "a"]}


def ds_config(stage: int, **zero: object) -> dict:
    if stage == 3:
        zero = {"stage3_param_persistence_threshold": 0, **zero}  # really shard even these tiny parameters
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": GA,
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default, after balancedmix's hook
    }


def reference(method: str, schedule: dict[int, list[str]], estimator: str = "raw") -> tuple[list[dict], list[torch.Tensor]]:
    """Single process, no DeepSpeed: every rank's micro-batches, each loss / (GA * world)."""
    model = make_model()
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS), tasks=TASKS, method=method, estimator=estimator)
    assert isinstance(opt.distributed, SingleProcess)
    diags = []
    for step in range(STEPS):
        for rank in range(WORLD):
            for i, task in enumerate(schedule[rank]):
                with opt.task(task):
                    (loss_fn(model, batch(step, rank, i, task)) / (GA * WORLD)).backward()
        opt.step()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return diags, [p.detach().clone() for p in model.parameters()]


COMPARED = ("grad_norm/", "update_share/", "coef/", "cos/", "num_microbatches/")
COMPARED_EXACT = ("grad_norm/total", "grad_norm/update", "grad_scale")


def assert_diag_equal(got: dict, want: dict) -> None:
    keys = [k for k in want if k.startswith(COMPARED) or k in COMPARED_EXACT]
    assert keys, "nothing to compare"
    assert got["step"] == want["step"]
    for k in keys:
        assert k in got, f"missing diagnostic {k}"
        assert math.isclose(got[k], want[k], rel_tol=RTOL, abs_tol=ATOL), f"{k}: deepspeed {got[k]} vs single {want[k]}"
    extra = {k for k in got if k.startswith(COMPARED)} - set(keys)
    assert not extra, f"diagnostics only in the DeepSpeed run: {extra}"


# ----------------------------------------------------------------------------- workers (run in the ranks)
def _train(rank: int, stage: int, method: str | None, schedule: dict[int, list[str]], in_block: bool = False, estimator: str = "raw") -> dict:
    """One engine: ``method=None`` is the plain DeepSpeed run (torch AdamW, no balancedmix)."""
    from balancedmix.distributed.deepspeed import attach

    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    opt = None if method is None else BalancedOptimizer(inner, tasks=TASKS, method=method, estimator=estimator)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt or inner, config=ds_config(stage))
    if opt is not None:
        assert attach(engine) is opt
    diags, modes = [], []
    for step in range(STEPS):
        for i, task in enumerate(schedule[rank]):
            xy = batch(step, rank, i, task)
            if opt is None:
                engine.backward(loss_fn(engine, xy))
                engine.step()
            elif in_block:  # accelerate: engine.step() runs inside accelerator.backward, inside the task block
                with opt.task(task):
                    engine.backward(loss_fn(engine, xy))
                    engine.step()
            else:
                with opt.task(task):
                    engine.backward(loss_fn(engine, xy))
                engine.step()
        if opt is not None:
            diags.append(opt.diagnostics())
            modes.append(opt.distributed.last_mode)
    if stage == 3:  # parameters are partitioned: gather them to compare
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            params = [p.detach().clone() for p in model.parameters()]
    else:
        params = [p.detach().clone() for p in model.parameters()]
    out = {"params": params, "diags": diags, "modes": modes}
    if opt is not None and stage > 0:
        out["buffer_numel"] = opt.buffers.data.shape[1]
        out["partition_numel"] = sum(p.numel() for p in opt.distributed.partitions)
    return out


def _stage_worker(rank: int, world: int, stage: int, methods: list[str], schedule: dict[int, list[str]]) -> dict:
    deepspeed.init_distributed("gloo")
    out = {"plain": _train(rank, stage, None, schedule)}
    for method in methods:
        out[method] = _train(rank, stage, method, schedule)
    out["normalize-in-block"] = _train(rank, stage, "normalize", schedule, in_block=True)
    if stage >= 2:
        out["split"] = _train(rank, stage, "normalize", schedule, estimator="split")
    return out


@pytest.mark.parametrize(
    "stage,schedule", [(0, UNALIGNED), (1, UNALIGNED), (2, ALIGNED), (3, ALIGNED)], ids=["zero0", "zero1", "zero2", "zero3"]
)
def test_zero_matches_plain_engine_and_single_process(stage: int, schedule: dict[int, list[str]]) -> None:
    methods = [m for m in ("sum", "normalize", "pcgrad") if m in available_methods()]
    results = run_ranks(_stage_worker, WORLD, stage, methods, schedule, timeout=TIMEOUT)
    n_params = sum(p.numel() for p in make_model().parameters())
    for res in results:
        # sum: bit-identical to the plain DeepSpeed run
        for got, want in zip(res["sum"]["params"], res["plain"]["params"]):
            assert torch.equal(got, want)
        # every method: per-task figures and parameters equal the single-process run on the global batch
        for method in methods + ["normalize-in-block"]:
            want_diags, want_params = reference(method.split("-")[0], schedule)
            run = res[method]
            assert run["modes"] == ([f"zero{stage}"] if stage else ["ddp"]) * STEPS  # ZeRO-0: plain data parallel
            for got, want in zip(run["diags"], want_diags):
                assert_diag_equal(got, want)
            for got, want in zip(run["params"], want_params):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if stage == 0:
                continue
            # sharded cost: the task buffers cover the rank's partition only (P, padded, split in 2)
            assert run["buffer_numel"] == run["partition_numel"] < n_params
            assert run["partition_numel"] * WORLD - n_params < 16  # alignment padding only
        if stage == 0:
            continue
        # measured cost (per rank, last step): rows = 3 tasks + untagged, all allocated up front
        rows, part = len(TASKS) + 1, res["sum"]["partition_numel"]
        meta = 1 + 2 * rows + 4 + WORLD  # float64: errors, used rows, counts, schedule hash, buffer bytes per rank
        stats = rows * rows + rows + 1  # float64: Gram of the rows, dots with the gradient, its squared norm
        local = rows * n_params * 4 if stage == 1 else 0  # ZeRO-1: local full-model rows
        span = 3 * n_params * 4 if stage == 1 else 0  # ZeRO-1: all-reduce of the 3 used rows
        last = res["sum"]["diags"][-1]
        assert last["buffer_bytes"] == rows * part * 4 + local
        assert last["comm_bytes"] == (meta + stats) * 8 + span
        # the correction changed something (normalize is not sum on these tasks)
        assert not all(torch.equal(a, b) for a, b in zip(res["normalize"]["params"], res["sum"]["params"]))
    if stage >= 2:
        # split estimator: micro-step i (the mean of every rank's micro-batch i) goes to one half as a whole;
        # "a" runs twice per rank, so its halves are the same sets as the single process's
        want_diags, want_params = reference("normalize", schedule, estimator="split")
        for res in results:
            for got, want in zip(res["split"]["diags"], want_diags):
                assert_diag_equal(got, want)
                for prefix in ("grad_sqnorm_unbiased/", "noise_trace/", "noise_scale/"):
                    k = prefix + "a"
                    assert math.isclose(got[k], want[k], rel_tol=RTOL, abs_tol=ATOL), f"{k}: {got[k]} vs {want[k]}"
    # ranks agree bitwise on every figure
    for key in methods + ["normalize-in-block"]:
        assert results[0][key]["diags"] == results[1][key]["diags"]


# ----------------------------------------------------------------------------- what is refused, and how
def _misaligned_worker(rank: int, world: int, stage: int) -> dict:
    from balancedmix.distributed.deepspeed import attach

    deepspeed.init_distributed("gloo")
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS), tasks=TASKS, method="normalize")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    attach(engine)
    schedule = ["a", "b", "a"] if rank == 0 else ["a", "c", "a"]  # micro-step 1: "b" on rank 0, "c" on rank 1
    error = None
    for i, task in enumerate(schedule):
        with opt.task(task):
            engine.backward(loss_fn(engine, batch(0, rank, i, task)))
        try:
            engine.step()
        except DistributedStateError as exc:
            error = str(exc)
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    else:
        unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    return {"error": error, "unchanged": unchanged}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero23_different_tasks_at_one_micro_step_raise_on_every_rank(stage: int) -> None:
    r0, r1 = run_ranks(_misaligned_worker, WORLD, stage, timeout=TIMEOUT)
    assert r0["error"] is not None and r0["error"] == r1["error"]
    assert f"ZeRO-{stage}" in r0["error"] and "same task" in r0["error"] and "MixtureSampler" in r0["error"]
    assert r0["unchanged"] and r1["unchanged"]


def _refusal_worker(rank: int, world: int) -> dict:
    from balancedmix.distributed.deepspeed import attach

    deepspeed.init_distributed("gloo")
    out: dict[str, str] = {}
    cases = {
        "offload": (2, {"offload_optimizer": {"device": "cpu"}}, {}, {"zero_force_ds_cpu_optimizer": False}),
        "skip_step": (2, {}, {"nonfinite": "skip_step"}, {}),
        "plain_optimizer": (2, {}, None, {}),
    }
    for name, (stage, zero, opt_kwargs, extra) in cases.items():
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=LR)
        opt = inner if opt_kwargs is None else BalancedOptimizer(inner, tasks=TASKS, **opt_kwargs)
        config = {**ds_config(stage, **zero), **extra}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        try:
            attach(engine)
        except (UnsupportedDistributedError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        else:
            out[name] = "attached"
    return out


def test_unsupported_deepspeed_configurations_fail_at_attach_naming_them() -> None:
    for res in run_ranks(_refusal_worker, WORLD, timeout=TIMEOUT):
        assert res["offload"].startswith("UnsupportedDistributedError") and "offload" in res["offload"]
        assert res["skip_step"].startswith("UnsupportedDistributedError") and "skip_step" in res["skip_step"]
        assert res["plain_optimizer"].startswith("TypeError") and "BalancedOptimizer" in res["plain_optimizer"]


# ----------------------------------------------------------------------------- through accelerate
def _accelerate_worker(rank: int, world: int, stage: int, methods: list[str], schedule: dict[int, list[str]]) -> dict:
    """A plain accelerate loop with a DeepSpeedPlugin: the wrapper is built before prepare, attached after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from balancedmix.distributed.deepspeed import attach

    out = {}
    for method in methods:
        AcceleratorState._reset_state(True)
        acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(stage)), gradient_accumulation_steps=GA)
        model = make_model()
        opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS), tasks=TASKS, method=method)
        pending = opt.distributed.kind
        engine, prepared = acc.prepare(model, opt)
        assert attach(engine) is opt
        diags = []
        for step in range(STEPS):
            for i, task in enumerate(schedule[rank]):
                with acc.accumulate(engine):
                    with opt.task(task):  # the engine steps inside accelerator.backward at the boundary
                        acc.backward(loss_fn(engine, batch(step, rank, i, task)))
                    prepared.step()
                    prepared.zero_grad()
            diags.append(opt.diagnostics())
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                params = [p.detach().clone() for p in model.parameters()]
        else:
            params = [p.detach().clone() for p in model.parameters()]
        out[method] = {"diags": diags, "params": params, "pending": pending, "mode": opt.distributed.last_mode}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_accelerate_deepspeed_plugin_matches_single_process(stage: int) -> None:
    schedule = UNALIGNED if stage <= 1 else ALIGNED
    methods = [m for m in ("normalize",) if m in available_methods()]
    results = run_ranks(_accelerate_worker, WORLD, stage, methods, schedule, timeout=TIMEOUT)
    for method in methods:
        want_diags, want_params = reference(method, schedule)
        for res in results:
            run = res[method]
            assert run["pending"] == "deepspeed-pending" and run["mode"] == (f"zero{stage}" if stage else "ddp")
            for got, want in zip(run["diags"], want_diags):
                assert_diag_equal(got, want)
            for got, want in zip(run["params"], want_params):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert results[0][method]["diags"] == results[1][method]["diags"]


# ----------------------------------------------------------------------------- the documented example
def _doc_command() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text().replace("\n", " ")
    # the launch line that names the ZeRO-2 config (other sections document other launches)
    end = text.index("examples/deepspeed_zero2.json") + len("examples/deepspeed_zero2.json")
    start = text.rindex("OMP_NUM_THREADS=1 python -m torch.distributed.run", 0, end)
    return " ".join(text[start:end].split())


@pytest.mark.slow
def test_deepspeed_example_runs_with_documented_command(tmp_path) -> None:
    import json
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from dist_harness import free_port

    root = Path(__file__).resolve().parents[1]
    cmd = _doc_command().replace("python -m", f"{sys.executable} -m").replace(
        "--nproc_per_node 2", f"--nproc_per_node 2 --master_port {free_port()}"
    )
    out = tmp_path / "diag.jsonl"
    env = dict(os.environ, PYTHONPATH=str(root), DS_ACCELERATOR="cpu")
    argv = shlex.split(cmd) + ["--steps", "2", "--jsonl", str(out)]
    while "=" in argv[0]:  # the documented VAR=value prefixes go into the environment (no shell)
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert out.exists(), f"no log written (rc {proc.returncode})\n{proc.stdout}\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2  # rank 0 only, one line per step
    for rec in records:
        assert rec["grad_norm/add"] > 0 and rec["grad_norm/rev"] > 0
        assert math.isclose(rec["update_share/add"] + rec["update_share/rev"], 1.0, abs_tol=1e-5)
    assert "ranks agree: 2 processes, distributed mode zero2" in proc.stdout, proc.stdout + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- bf16 (the usual GPU setting)
def _bf16_worker(rank: int, world: int) -> dict:
    from balancedmix.distributed.deepspeed import attach

    deepspeed.init_distributed("gloo")
    out = {}
    for stage in (1, 2, 3):
        model = make_model()
        opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS), tasks=TASKS, method="normalize")
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={**ds_config(stage), "bf16": {"enabled": True}})
        attach(engine)
        diags = []
        for step in range(STEPS):
            for i, task in enumerate(ALIGNED[rank]):
                with opt.task(task):
                    engine.backward(loss_fn(engine, tuple(t.bfloat16() for t in batch(step, rank, i, task))))
                engine.step()
            diags.append(opt.diagnostics())
        out[stage] = diags
    return out


def test_bf16_zero123_diagnostics_close_to_float32_single_process() -> None:
    """bf16 parameters and gradients (DeepSpeed accumulates and reduces in bf16): the figures of the
    first step are those of the float32 single process to bf16 precision, and ranks agree."""
    want = reference("normalize", ALIGNED)[0][0]
    r0, r1 = run_ranks(_bf16_worker, WORLD, timeout=TIMEOUT)
    for stage in (1, 2, 3):
        assert r0[stage] == r1[stage]
        got = r0[stage][0]
        for task in ("a", "b"):
            assert math.isclose(got[f"grad_norm/{task}"], want[f"grad_norm/{task}"], rel_tol=2e-2)
            assert math.isclose(got[f"update_share/{task}"], want[f"update_share/{task}"], abs_tol=1e-2)
        assert abs(got["grad_scale"] - 1.0) < 1e-3  # p.grad is (a bf16 rounding of) the captured sum
