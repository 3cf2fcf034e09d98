"""GRPO step: plain TRL ``GRPOTrainer`` vs ``BalancedGRPOTrainer`` per optimizer step on the demo model.

The demo's tiny random-init Llama and character tokenizer (``balancedmix.demo.toy``), three
synthetic tasks, 4 generations per prompt, completions of at most 16 tokens, 8 completions per
device batch and 2 accumulation steps. Every trainer runs ``repeats + 1`` steps from the same
seed; the first step (compilation of caches, allocation of the task buffers) is dropped; the
figure is the median wall time between TRL's ``on_step_begin`` and ``on_step_end`` (generation,
reward, forward/backward of every micro-batch and the optimizer step).
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


def _time_trainer(kind: str, method: str, steps: int, tmp: str, quick: bool) -> list[float]:
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
    model = build_tiny_causal_lm(tok, hidden_size=32 if quick else 64, num_layers=2, seed=0)
    args = GRPOConfig(
        output_dir=f"{tmp}/{kind}-{method}", use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", num_generations=4, max_completion_length=8 if quick else 16,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=steps, logging_steps=1,
        learning_rate=1e-3, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    common = dict(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(16), processing_class=tok, callbacks=[Clock()])
    if kind == "plain":
        trainer = GRPOTrainer(**common)
    else:
        trainer = BalancedGRPOTrainer(**common, balanced=BalancedConfig(tasks=list(TASKS), method=method, write_jsonl=False))
    trainer.train()
    return times[1:]


def run(quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    try:
        import trl  # noqa: F401

        from balancedmix.integrations.trl import BalancedGRPOTrainer  # noqa: F401
    except ImportError as exc:
        return {"suite": "grpo", "rows": [], "tables": [], "targets": [], "notes": [], "skipped": [f"GRPO step: {exc}"]}
    from balancedmix import available_methods

    configs = [("plain", "—"), ("balanced", "sum")] + ([("balanced", "pcgrad")] if "pcgrad" in available_methods() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, method in configs:
            ts = _time_trainer(kind, method if method != "—" else "sum", repeats + 1, tmp, quick)
            rows.append({"name": "GRPOTrainer" if kind == "plain" else f"BalancedGRPOTrainer {method}",
                         "method": method, "times_s": ts, "median_s": statistics.median(ts)})
    base = rows[0]["median_s"]
    for r in rows:
        r["ratio"] = r["median_s"] / base
        r["time"] = fmt_time(r["median_s"])
        r["ratio_s"] = fmt_ratio(r["ratio"])
    sum_row = next(r for r in rows if r["method"] == "sum")
    return {
        "suite": "grpo", "rows": rows,
        "tables": [{"caption": "GRPO optimizer step (generation + loss + backward + step), demo model on CPU",
                    "columns": [("trainer", "name"), ("median step", "time"), ("× plain", "ratio_s")], "rows": rows}],
        "targets": [target("BalancedGRPOTrainer(sum) ÷ GRPOTrainer step", sum_row["ratio"], 1.03)],
        "notes": [f"demo model (char tokenizer, Llama hidden {32 if quick else 64}, 2 layers), 3 tasks, 4 generations, "
                  f"batch 8 × 2 accumulation steps; trainers run one after another, median of {repeats} steps after 1 warm-up"],
        "skipped": [],
    }


if __name__ == "__main__":
    from .common import render_suite

    print(render_suite("GRPO step (CPU)", run(quick="--quick" in sys.argv, repeats=2 if "--quick" in sys.argv else 5)))
