"""GRPO step: plain TRL ``GRPOTrainer`` vs ``BalancedGRPOTrainer`` per optimizer step.

Two models, both the demo's random-init Llama and character tokenizer (``balancedmix.demo.toy``)
with three synthetic tasks and 4 generations per prompt, completions of at most 16 tokens:

* ``demo``: hidden 64, 2 layers (77k parameters); 8 completions per device batch, 2 accumulation
  steps (4 prompts per optimizer step);
* ``598k``: hidden 128, 4 layers (598k parameters); 16 completions per device batch, 4
  accumulation steps (16 prompts per optimizer step).

Variants: plain ``GRPOTrainer``; ``BalancedGRPOTrainer`` with ``sum`` (and ``pcgrad`` /
``normalize``) in its default ``homogeneous="auto"`` mode (task quotas in whole micro-batches: no
micro-batch mixes tasks, no split forward); and ``sum`` with ``homogeneous=False`` (TRL's sampler:
micro-batches that mix tasks are split into per-task forwards), the cost this mode removes.

Every variant runs ``rounds`` times, interleaved (plain, A, B, ..., then the next round in the
reverse order), each run
``repeats + 1`` steps from the same seed with the first step dropped; a run's figure is the median
wall time between TRL's ``on_step_begin`` and ``on_step_end`` (generation, reward, forward/backward
of every micro-batch and the optimizer step). The ratio is the median over rounds of
(variant ÷ plain of the same round). The homogeneous variants draw their prompts by task quota,
plain TRL by a shuffle: the same prompt distribution, not the same prompts.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .common import fmt_ratio, fmt_time, target

__all__ = ["run"]

TASKS = ("add", "copy", "rev")


def _dataset(n_per_task: int) -> Any:
    from datasets import Dataset

    rows = []
    for i in range(n_per_task):
        rows.append({"prompt": f"{i % 50}+{(i + 1) % 50}=", "task": "add", "answer": str(i % 50 + (i + 1) % 50)})
        rows.append({"prompt": f"copy {chr(97 + i % 26)}{chr(98 + i % 25)}:", "task": "copy", "answer": f"{chr(97 + i % 26)}{chr(98 + i % 25)}"})
        rows.append({"prompt": f"rev {chr(99 + i % 24)}a:", "task": "rev", "answer": f"a{chr(99 + i % 24)}"})
    return Dataset.from_list(rows)


def _reward(prompts: Any, completions: Any, task: Any, answer: Any, **kwargs: Any) -> list[float]:
    return [float(a in c) + 0.01 * len(c) for c, a in zip(completions, answer)]


MODELS = {
    # name: (hidden, layers, per-device batch, accumulation steps, prompts per task in the dataset)
    "demo": (64, 2, 8, 2, 16),
    "598k": (128, 4, 16, 4, 32),
}


def _time_trainer(
    kind: str, method: str, steps: int, tmp: str, quick: bool, model_name: str = "demo", homogeneous: Any = "auto"
) -> list[float]:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm
    from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    hidden, layers, batch, accum, per_task = MODELS[model_name]
    model = build_tiny_causal_lm(tok, hidden_size=32 if quick else hidden, num_layers=layers, seed=0)
    args = GRPOConfig(
        output_dir=f"{tmp}/{model_name}-{kind}-{method}-{homogeneous}", use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", num_generations=4, max_completion_length=8 if quick else 16,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=steps, logging_steps=1,
        learning_rate=1e-3, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    common = dict(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(per_task), processing_class=tok, callbacks=[Clock()])
    if kind == "plain":
        trainer = GRPOTrainer(**common)
    else:
        config = BalancedConfig(tasks=list(TASKS), method=method, write_jsonl=False, homogeneous=homogeneous)
        trainer = BalancedGRPOTrainer(**common, balanced=config)
    trainer.train()
    return times[1:]


def _variants(model_name: str, methods: Sequence[str]) -> list[tuple[str, str, str, Any]]:
    """(row name, kind, method, homogeneous) of one model's variants; the plain trainer first."""
    extra = "pcgrad" if model_name == "demo" else "normalize"
    out = [("GRPOTrainer", "plain", "sum", "auto"), ("BalancedGRPOTrainer sum", "balanced", "sum", "auto")]
    if extra in methods:
        out.append((f"BalancedGRPOTrainer {extra}", "balanced", extra, "auto"))
    out.append(("BalancedGRPOTrainer sum, homogeneous=False (split)", "balanced", "sum", False))
    return out


def run(quick: bool = False, repeats: int = 5, rounds: int | None = None) -> dict[str, Any]:
    try:
        import trl  # noqa: F401

        from balancedmix.integrations.trl import BalancedGRPOTrainer  # noqa: F401
    except ImportError as exc:
        return {"suite": "grpo", "rows": [], "tables": [], "targets": [], "notes": [], "skipped": [f"GRPO step: {exc}"]}
    from balancedmix import available_methods

    rounds = rounds or (1 if quick else 5)
    models = ("demo",) if quick else tuple(MODELS)
    methods = available_methods()
    rows: list[dict[str, Any]] = []
    tables, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            variants = _variants(model_name, methods)
            runs: dict[str, list[list[float]]] = {name: [] for name, *_ in variants}
            for r in range(rounds):
                # alternate the order each round, so that a drift in the machine's load favours no variant
                for name, kind, method, homogeneous in variants if r % 2 == 0 else variants[::-1]:
                    runs[name].append(_time_trainer(kind, method, repeats + 1, tmp, quick, model_name, homogeneous))
            base = [statistics.median(ts) for ts in runs["GRPOTrainer"]]
            model_rows = []
            for name, kind, method, homogeneous in variants:
                medians = [statistics.median(ts) for ts in runs[name]]
                ratio = statistics.median(m / b for m, b in zip(medians, base))
                model_rows.append({
                    "model": model_name, "name": name, "method": method, "homogeneous": homogeneous,
                    "times_s": [t for ts in runs[name] for t in ts], "run_medians_s": medians,
                    "median_s": statistics.median(medians), "ratio": ratio,
                    "time": fmt_time(statistics.median(medians)), "ratio_s": fmt_ratio(ratio),
                    "ratio_range": f"{min(m / b for m, b in zip(medians, base)):.3f}–{max(m / b for m, b in zip(medians, base)):.3f}",
                })  # fmt: skip
            rows.extend(model_rows)
            hidden, layers, batch, accum, _ = MODELS[model_name]
            tables.append({
                "caption": f"GRPO optimizer step (generation + loss + backward + step), {model_name} model on CPU "
                           f"(hidden {32 if quick else hidden}, {layers} layers; {batch} completions × {accum} accumulation steps)",
                "columns": [("trainer", "name"), ("median step", "time"), ("× plain", "ratio_s"), ("per-round range", "ratio_range")],
                "rows": model_rows,
            })  # fmt: skip
            sum_row = next(r for r in model_rows if r["name"] == "BalancedGRPOTrainer sum")
            targets.append(target(f"BalancedGRPOTrainer(sum) ÷ GRPOTrainer step, {model_name} model", sum_row["ratio"], 1.05))
    return {
        "suite": "grpo", "rows": rows, "tables": tables, "targets": targets,
        "notes": [f"3 tasks, 4 generations per prompt, completions ≤ {8 if quick else 16} tokens; {rounds} interleaved "
                  f"round(s) per model (order reversed every other round), each variant's run a median of {repeats} steps after 1 warm-up; × plain is the "
                  "median over rounds of the ratio to the plain run of the same round",
                  "homogeneous=auto (the default) draws task quotas in whole micro-batches, so no micro-batch mixes "
                  "tasks; homogeneous=False keeps TRL's sampler and splits mixed micro-batches (the previous default)"],
        "skipped": [],
    }


if __name__ == "__main__":
    from .common import render_suite

    print(render_suite("GRPO step (CPU)", run(quick="--quick" in sys.argv, repeats=2 if "--quick" in sys.argv else 5)))
