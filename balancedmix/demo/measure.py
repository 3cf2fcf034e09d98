"""A small measurement run: per-task gradient diagnostics of a tiny LM on two synthetic tasks."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from ..logger import JSONLLogger
from ..optimizer import BalancedOptimizer
from .toy import build_char_tokenizer, build_tiny_causal_lm

TASKS = ("add", "rev")


def _example(task: str, rng: random.Random) -> str:
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}={a + b}"
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
    return f"rev {word}:{word[::-1]}"


def run_measurement(steps: int = 20, method: str = "sum", out: str = "demo_out", seed: int = 0) -> dict[str, float]:
    """Train ``steps`` steps (4 micro-batches, tasks alternating); write ``out/metrics.jsonl``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, seed=seed)
    log = JSONLLogger(Path(out) / "metrics.jsonl", overwrite=True)
    opt = BalancedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=3e-3), tasks=list(TASKS), method=method, estimator="split", on_step=log
    )
    bar = tqdm(range(steps), desc=f"measure ({method})")
    for _ in bar:
        for m in range(4):
            task = TASKS[m % 2]
            batch = tok([_example(task, rng) for _ in range(8)], return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with opt.task(task):
                (model(**batch, labels=labels).loss / 4).backward()
        opt.step()
        opt.zero_grad()
        d = opt.diagnostics()
        bar.set_postfix({f"|g_{t}|": round(d[f"grad_norm/{t}"], 3) for t in TASKS})
    log.close()
    return opt.diagnostics()
