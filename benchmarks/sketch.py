"""Sketch suite: accuracy, time and memory of ``BalancedOptimizer(..., sketch_dim=d)`` against exact mode.

Accuracy: one training step of the ~10 M Llama (K = 4 tasks, 8 task-homogeneous micro-batches,
task t's loss weighted by ``LOSS_WEIGHTS[t]`` so the task norms span a factor ~30, as in the
imbalance the library measures) is run in exact mode and its per-task gradients ``G_t`` are
captured. For each ``d`` they are sketched under ``REPEATS`` independent hashes and the
sketched figures are compared with the exact ones: relative error of each task's squared norm,
absolute error of the cosines and update shares, relative error of ``normalize``'s and
``imtl_g``'s coefficients; beside each, the standard error the library reports for it
(delta method on the sketched Gram, ``sketch_se``) and, for squared norms, the closed form
``sqrt(2/d)``.

Time and memory: plain AdamW, exact ``normalize`` and sketched ``normalize`` (lagged) on the same
micro-batches, timed interleaved; extra bytes are the storages' ``nbytes``.

Run directly: ``python benchmarks/sketch.py [--quick] [--repeats N] [--out DIR]``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .common import (
    QUICK_LLAMA,
    QWEN_05B,
    TINY_LLAMA,
    ModelSpec,
    Workload,
    build_model,
    fmt_bytes,
    fmt_ratio,
    fmt_ratio_ci,
    fmt_time,
    make_microbatches,
    ratio_target,
    target,
    task_names,
    time_paired,
    time_runners,
    token_ce,
)

__all__ = ["run", "capture_task_gradients", "capture_grpo_gradients", "accuracy_rows", "LOSS_WEIGHTS", "FULL_DIMS", "QUICK_DIMS", "GPU_DIMS"]

#: per-task loss weights: task norms spread over ~1.5 decades (task3 is below 10 % of task0)
LOSS_WEIGHTS = (1.0, 0.3, 0.12, 0.03)
FULL_DIMS = (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20)
QUICK_DIMS = (1 << 6, 1 << 8, 1 << 10)
#: the GPU suite (Qwen2.5-0.5B shape, bf16): the issue's targets are at d = 2^18
GPU_DIMS = (1 << 14, 1 << 16, 1 << 18, 1 << 20)
#: the demo's GRPO model has P = 77,504: d = 2^17 ≥ P sketches it exactly
GRPO_DIMS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 17)
FULL_WORKLOAD = Workload(num_microbatches=8, batch=2, seq=64)
#: RL-sized sequences: the hash costs the same per micro-batch, forward/backward grow with tokens
LONG_WORKLOAD = Workload(num_microbatches=8, batch=2, seq=256)
QUICK_WORKLOAD = Workload(num_microbatches=4, batch=2, seq=16)
SKETCH_REPEATS = 4
CPU_TARGET_DIM = 1 << 16


def capture_task_gradients(spec: ModelSpec, workload: Workload, k: int = 4, device: str = "cpu",
                           dtype: torch.dtype = torch.float32) -> tuple[list[str], torch.Tensor]:
    """Exact per-task gradients ``[K, P]`` (float64) of one step, from exact-mode ``captured_gradients()``."""
    from balancedmix import BalancedOptimizer

    from .runners import CaptureOptimizer

    model = build_model(spec, device=device, dtype=dtype)
    names = task_names(k)
    opt = BalancedOptimizer(CaptureOptimizer(model.parameters()), tasks=names)
    mbs = make_microbatches(workload, spec.vocab_size, device=device)
    weights = [LOSS_WEIGHTS[t % len(LOSS_WEIGHTS)] for t in range(k)]
    for m, ids in enumerate(mbs):
        t = m % k
        with opt.task(names[t]):
            (weights[t] * token_ce(model, ids).mean() / len(mbs)).backward()
    captured = opt.captured_gradients()
    opt.remove_hooks()
    return names, torch.stack([captured[n].double().cpu() for n in names])


def capture_grpo_gradients(sft_steps: int = 200, grpo_steps: int = 2, seed: int = 0,
                           quick: bool = False) -> tuple[list[str], torch.Tensor]:
    """Exact per-task gradients ``[K, P]`` (float64) of the demo's GRPO run: the demo's model (77k
    parameters) warm-started on its four-task suite, then ``BalancedGRPOTrainer`` (exact mode,
    ``sum``, every task at every step); the gradients of the last step's micro-batches, per task,
    read from ``captured_gradients()`` just before the optimizer step."""
    import tempfile

    from transformers import PrinterCallback, TrainerCallback

    from balancedmix.demo.run import DemoConfig, _build, _equal_mixture, _grpo_args
    from balancedmix.demo.suite import sft_warm_start
    from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer

    cfg = DemoConfig(sft_steps=20 if quick else sft_steps, grpo_steps=grpo_steps, n_train=64 if quick else 256)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, train, _, rewards, _, tasks = _build(cfg, seed, torch.device("cpu"))
        sft_warm_start(model, tok, [train[i] for i in range(len(train))], steps=cfg.sft_steps,
                       batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=seed)
        captured: dict[str, torch.Tensor] = {}

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                captured.clear()
                captured.update(trainer.balanced_optimizer.captured_gradients())

        with tempfile.TemporaryDirectory() as tmp:
            trainer = BalancedGRPOTrainer(
                model=model, reward_funcs=rewards, args=_grpo_args(cfg, Path(tmp), grpo_steps, seed),
                train_dataset=train, processing_class=tok, callbacks=[Grab()],
                balanced=BalancedConfig(task_key="task", tasks=list(tasks), method="sum",
                                        schedule=_equal_mixture(tasks), write_jsonl=False),
            )
            trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    names = [t for t in tasks if t in captured]
    return names, torch.stack([captured[n].double() for n in names])


def _figures(gram: torch.Tensor) -> torch.Tensor:
    """The diagnostics compared: squared norms, cosines (upper triangle), update shares (sum)."""
    from balancedmix import stats

    k = gram.shape[0]
    iu = torch.triu_indices(k, k, 1)
    cos = stats.cosines(gram)[iu[0], iu[1]]
    return torch.cat([torch.diagonal(gram), cos, stats.update_shares(gram)])


def _coefficients(gram: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    from balancedmix.methods import MethodContext, imtl_g_weights, make_method

    ctx = MethodContext(tasks=tuple(names), step=0, generator=torch.Generator().manual_seed(0))
    return {"normalize": make_method("normalize")(gram.clone(), ctx), "imtl_g": imtl_g_weights(gram.clone())}


def accuracy_rows(names: list[str], grads: torch.Tensor, dims: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """One row per ``d``: RMS errors over ``repeats`` hashes next to the predicted standard errors."""
    from balancedmix.sketch import CountSketch, delta_standard_errors

    k = grads.shape[0]
    gram = grads @ grads.T
    exact = _figures(gram)
    exact_coef = _coefficients(gram, names)
    sq = torch.diagonal(gram)
    big = sq.sqrt() >= 0.1 * sq.sqrt().max()  # tasks whose norm is ≥ 10 % of the largest
    nonzero = sq > 0  # a task with no gradient this step (GRPO: all rewards equal) has no relative error
    n_cos = k * (k - 1) // 2
    rows = []
    grads32 = grads.float()  # what the hooks sketch (float32 gradients); converted once, outside the timing
    for d in dims:
        rel_sq, rel_sq_big, cos_err, share_err, se_rel_sq, se_cos, se_share = [], [], [], [], [], [], []
        coef_err: dict[str, list[float]] = {m: [] for m in exact_coef}
        times = []
        for r in range(repeats):
            cs = CountSketch(d, seed=1000 + r)
            key = cs.key(0)
            cs.draws(key, -(-grads.shape[1] // d))  # the key's draws, made once per step (not timed)
            t0 = time.perf_counter()
            sk = torch.stack([cs.add_(torch.zeros(d, dtype=torch.float32), g, 0, key) for g in grads32]).double()
            times.append((time.perf_counter() - t0) / k)
            g_hat = sk @ sk.T
            fig = _figures(g_hat)
            se = delta_standard_errors(_figures, g_hat, d)
            rel = (fig[:k] - exact[:k]) / torch.where(nonzero, exact[:k], torch.ones_like(exact[:k]))
            rel_sq += rel[nonzero].tolist()
            rel_sq_big += rel[big].tolist()
            se_rel_sq += (se[:k] / fig[:k])[nonzero].tolist()
            cos_err += (fig[k : k + n_cos] - exact[k : k + n_cos]).tolist()
            se_cos += se[k : k + n_cos].tolist()
            share_err += (fig[k + n_cos :] - exact[k + n_cos :]).tolist()
            se_share += se[k + n_cos :].tolist()
            for m, c in _coefficients(g_hat, names).items():
                coef_err[m] += ((c - exact_coef[m]) / exact_coef[m].abs().clamp_min(1e-30)).tolist()

        def rms(xs: list[float]) -> float:
            return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else float("nan")

        rows.append({
            "d": d,
            "log2_d": int(math.log2(d)),
            "sqnorm_rel_rms": rms(rel_sq),
            "sqnorm_rel_rms_big": rms(rel_sq_big),
            "sqnorm_rel_max_big": max(abs(x) for x in rel_sq_big),
            "sqnorm_rel_se": statistics.mean(se_rel_sq),
            "sqnorm_rel_se_formula": math.sqrt(2.0 / d),
            "cos_abs_rms": rms(cos_err),
            "cos_se": statistics.mean(se_cos) if se_cos else float("nan"),
            "share_abs_rms": rms(share_err),
            "share_se": statistics.mean(se_share),
            "normalize_coef_rel_rms": rms(coef_err["normalize"]),
            "imtl_g_coef_rel_rms": rms(coef_err["imtl_g"]),
            "sketch_s_per_task": statistics.median(times),
            "sketch_bytes": (k + 2) * d * 4,  # K rows and the [2d] scratch of the row being written
            "exact_bytes": k * grads.shape[1] * 4,
        })
    return rows


def run(quick: bool = False, repeats: int = 5, device: str = "cpu", spec: ModelSpec | None = None,
        dtype: torch.dtype = torch.float32, workload: Workload | None = None,
        dims: tuple[int, ...] | None = None, timing: bool = True, budget_s: float | None = None) -> dict[str, Any]:
    """Run the sketch suite; returns the suite dict (rows, tables, targets, notes).

    ``budget_s``: seconds of paired timing per workload on the CPU (default 90, quick 3).
    """
    from .runners import balanced_runner, plain_runner

    spec = spec or (QUICK_LLAMA if quick else TINY_LLAMA)
    budget_s = budget_s if budget_s is not None else (3.0 if quick else 90.0)
    workload = workload or (QUICK_WORKLOAD if quick else FULL_WORKLOAD)
    dims = dims or (QUICK_DIMS if quick else FULL_DIMS)
    k = 4
    names, grads = capture_task_gradients(spec, workload, k, device=device, dtype=dtype)
    p = grads.shape[1]
    acc = accuracy_rows(names, grads, dims, 2 if quick else SKETCH_REPEATS)
    for r in acc:
        r["source"] = spec.name
        r["memory_s"] = f"{fmt_bytes(r['sketch_bytes'])} ({r['sketch_bytes'] / r['exact_bytes']:.2%} of exact)"
        r["sketch_time_s"] = fmt_time(r["sketch_s_per_task"])
        for key in ("sqnorm_rel_rms_big", "sqnorm_rel_max_big", "sqnorm_rel_se", "sqnorm_rel_se_formula",
                    "normalize_coef_rel_rms", "imtl_g_coef_rel_rms"):
            r[key + "_pct"] = f"{100 * r[key]:.3g} %"
    norms = (grads @ grads.T).diagonal().sqrt()
    notes = [
        f"model {spec.name} (P = {p:,}), {workload.num_microbatches} micro-batches of {workload.batch}×{workload.seq} "
        f"tokens, K = {k}, task t's loss weighted by {LOSS_WEIGHTS[:k]}: task norms "
        + ", ".join(f"{n}: {float(v):.3g}" for n, v in zip(names, norms))
        + f"; errors are RMS over {2 if quick else SKETCH_REPEATS} independent hashes (seeds) of the same gradients",
        "squared-norm error columns: tasks whose norm is ≥ 10 % of the largest; 'reported SE' is the mean of the "
        "standard error the optimizer reports (`*_se` keys, delta method on the sketched Gram), "
        "'sqrt(2/d)' the closed-form bound for a squared norm",
    ]
    tables = [{
        "caption": "Accuracy of the sketched figures against exact mode (same gradients)",
        "columns": [("d", "d"), ("sq-norm rel. err (RMS)", "sqnorm_rel_rms_big_pct"), ("max", "sqnorm_rel_max_big_pct"),
                    ("reported SE", "sqnorm_rel_se_pct"), ("sqrt(2/d)", "sqnorm_rel_se_formula_pct"),
                    ("cos abs err (RMS)", "cos_abs_rms"), ("cos SE", "cos_se"), ("share abs err", "share_abs_rms"),
                    ("share SE", "share_se"), ("normalize coef rel err", "normalize_coef_rel_rms_pct"),
                    ("imtl_g coef rel err", "imtl_g_coef_rel_rms_pct"), ("memory ((K+2)×d×4 B)", "memory_s"),
                    ("sketch time per task gradient", "sketch_time_s")],
        "rows": acc,
    }]

    if device == "cpu":  # the demo's GRPO gradients (a CPU model): the second source of real gradients
        gnames, ggrads = capture_grpo_gradients(quick=quick)
        gacc = accuracy_rows(gnames, ggrads, QUICK_DIMS if quick else GRPO_DIMS, 2 if quick else SKETCH_REPEATS)
        for r in gacc:
            r["source"] = "demo GRPO"
            for key in ("sqnorm_rel_rms", "sqnorm_rel_se", "sqnorm_rel_se_formula", "normalize_coef_rel_rms"):
                r[key + "_pct"] = f"{100 * r[key]:.3g} %"
        gnorms = (ggrads @ ggrads.T).diagonal().sqrt()
        notes.append(
            f"demo GRPO gradients: the demo's model (P = {ggrads.shape[1]:,}) warm-started on its suite, then "
            "BalancedGRPOTrainer (exact, sum, every task each step); the last step's per-task gradients, norms "
            + ", ".join(f"{n}: {float(v):.3g}" for n, v in zip(gnames, gnorms))
            + " (a task whose rewards were all equal has no gradient and no relative error); blocks of d coordinates "
            "never collide inside, so the error falls below sqrt(2/d) once d nears P and is 0 for d ≥ P"
        )
        tables.append({
            "caption": f"Accuracy on the demo's GRPO gradients (P = {ggrads.shape[1]:,})",
            "columns": [("d", "d"), ("sq-norm rel. err (RMS)", "sqnorm_rel_rms_pct"), ("reported SE", "sqnorm_rel_se_pct"),
                        ("sqrt(2/d)", "sqnorm_rel_se_formula_pct"), ("cos abs err (RMS)", "cos_abs_rms"), ("cos SE", "cos_se"),
                        ("share abs err", "share_abs_rms"), ("share SE", "share_se"),
                        ("normalize coef rel err", "normalize_coef_rel_rms_pct")],
            "rows": gacc,
        })
        acc_grpo = gacc
    else:
        acc_grpo = []

    def acc_at(d: int, key: str) -> float | None:
        return next((r[key] for r in acc if r["d"] == d), None)

    cuda = device.startswith("cuda")
    tdim = dims[-1] if quick else (1 << 18 if cuda else CPU_TARGET_DIM)
    targets = [
        target(f"squared-norm relative error (RMS, tasks ≥ 10 % of the largest norm), d = 2^{int(math.log2(tdim))}",
               acc_at(tdim, "sqnorm_rel_rms_big"), 0.01),
    ]
    if (1 << 18) in dims and tdim != 1 << 18:
        targets.append(target("squared-norm relative error (RMS, tasks ≥ 10 % of the largest norm), d = 2^18",
                              acc_at(1 << 18, "sqnorm_rel_rms_big"), 0.01))
    for r in acc:
        r["se_ratio"] = r["sqnorm_rel_rms"] / r["sqnorm_rel_se_formula"]
    worst = max(r["se_ratio"] for r in acc)
    targets.append(target("observed squared-norm error ÷ sqrt(2/d), worst d (≈ 1 expected; ≤ 2)", worst, 2.0))
    if acc_grpo:
        worst_grpo = max(r["sqnorm_rel_rms"] / r["sqnorm_rel_se_formula"] for r in acc_grpo)
        targets.append(target("demo GRPO gradients: observed squared-norm error ÷ sqrt(2/d), worst d (≤ 1 expected; ≤ 2)",
                              worst_grpo, 2.0))

    rows: list[dict[str, Any]] = list(acc) + list(acc_grpo)
    skipped: list[str] = []
    if timing:
        plan = [workload] + ([LONG_WORKLOAD] if not quick and not cuda and workload is FULL_WORKLOAD else [])
        timed: list[dict[str, Any]] = []
        for wl in plan:
            common = dict(device=device, dtype=dtype)
            factories = [
                lambda wl=wl: plain_runner(spec, wl, k, **common),
                lambda wl=wl: balanced_runner(spec, wl, k, "normalize", "raw", **common),
                lambda wl=wl: balanced_runner(spec, wl, k, "normalize", "raw", sketch_dim=tdim, **common),
                # measurement only: every coefficient is 1, so the hooks add no scaling pass
                lambda wl=wl: balanced_runner(spec, wl, k, "sum", "raw", sketch_dim=tdim, **common),
            ]
            if cuda:
                group = time_runners(factories, repeats, device=device, interleave=False)
            else:  # paired, interleaved rounds until every ratio's interval is within 1 % (or the budget)
                group = time_paired(factories, budget_s=budget_s, min_pairs=max(6, repeats), device=device)
            base = group[0]["median_s"]
            dim_s = f"d = 2^{int(math.log2(tdim))}"
            labels = ("plain AdamW", "exact normalize", f"sketch normalize, {dim_s}", f"sketch sum (measurement only), {dim_s}")
            for r, label in zip(group, labels):
                r["configuration"] = label
                r["tokens_per_microbatch"] = wl.batch * wl.seq
                if cuda:
                    r["ratio"] = r["median_s"] / base
                r["time"] = fmt_time(r["median_s"])
                r["ratio_s"] = fmt_ratio(r["ratio"]) if cuda else fmt_ratio_ci(r)
                r["extra_s"] = fmt_bytes(r.get("extra_bytes"))
                r["extra_share"] = f"{(r.get('extra_bytes') or 0) / (4 * p):.3%}"
            timed += group
        tables.append({"caption": "Time per training step and extra memory (same micro-batches, interleaved)",
                       "columns": [("tokens/micro-batch", "tokens_per_microbatch"), ("configuration", "configuration"),
                                   ("median step", "time"), ("× plain", "ratio_s"), ("extra bytes", "extra_s"),
                                   ("extra ÷ (P×4 B)", "extra_share")],
                       "rows": timed})
        for wl in plan:
            for method in ("normalize", "sum"):
                sk_row = next(r for r in timed if r["tokens_per_microbatch"] == wl.batch * wl.seq
                              and r["configuration"].startswith(f"sketch {method}"))
                name = f"sketch {method} step ÷ plain step, {wl.batch * wl.seq} tokens/micro-batch"
                if cuda:
                    targets.append(target(name, sk_row["ratio"], 1.02))
                else:
                    targets.append(ratio_target(name, sk_row, 1.02))
        sk_bytes = next(r for r in timed if r["configuration"].startswith("sketch")).get("extra_bytes")
        targets.append(target("sketch extra bytes == (K + 2) × d × 4: K rows and a 2d scratch (1 = yes)",
                              1.0 if sk_bytes == (k + 2) * tdim * 4 else 0.0, 1.0, ">="))
        rows += timed
        how = (f"median of {repeats} steps" if cuda else
               f"paired interleaved rounds (ratio per round, median and its 95 % interval; until the half-width is "
               f"≤ 1 % or {budget_s:.0f} s per workload, at least {max(6, repeats)} rounds)")
        notes.append(f"timing: {how} after 1 warm-up; AdamW(lr=1e-4); the exact run holds K×P float32 buffers, "
                     "the sketch run K×d plus a 2d scratch")
    # the memory target is stated for the 0.5B shape: (K + 2) × d values against its P
    p05 = QWEN_05B.num_params()
    targets.append(target(f"(K + 2) × 2^18 ÷ P for the {QWEN_05B.name} model (P = {p05:,}; sketch memory does not depend on P)",
                          (k + 2) * (1 << 18) / p05, 0.01))
    return {"suite": "sketch", "device": device, "model": spec.name, "workload": vars(workload), "rows": rows,
            "tables": tables, "targets": targets, "notes": notes, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    from .common import suite_main

    return suite_main("sketch", "Sketch (CPU)", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
