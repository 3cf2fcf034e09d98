"""A synthetic multi-task suite with verifiable rewards, built in code.

Four tasks that differ the way real post-training tasks do:

========== ======================== ============ ======================== ==================
task       prompt -> answer         answer len   reward                   difficulty
========== ======================== ============ ======================== ==================
``add``    ``"37+5="`` -> ``"42"``     1-3 chars    exact match, 0/1 (sparse) carries: hard
``reverse````"rev cfaj:"`` -> ``"jafc"`` 3-7 chars    per-position credit       copy: easy-medium
``sort``   ``"sort 4915:"`` -> ``"1459"`` 3-6 chars  exact match, 0/1 (sparse) medium
``parity`` ``"par 1011?"`` -> ``"no"``   2-3 chars    exact match, 0/1 (50% by  XOR: hard for a
                                                     chance: dense, noisy)     small model
========== ======================== ============ ======================== ==================

(``parity``: ``"yes"`` when the bit string holds an even number of ``1``.)

Everything is deterministic for a seed: :func:`build_splits` returns train and held-out eval
splits as ``datasets.Dataset`` with columns ``prompt``, ``task``, ``answer`` (no eval prompt
appears in train); :func:`reward_functions` returns one TRL reward function per task (signature
``f(prompts, completions, task, answer, **kw) -> list[float | None]``, ``None`` on other tasks'
rows); :func:`sft_warm_start` is a short plain-PyTorch supervised warm start on prompt+answer so
that GRPO starts with non-zero reward; :func:`evaluate` is greedy held-out accuracy per task.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TASKS",
    "SuiteConfig",
    "TaskSpec",
    "task_specs",
    "make_example",
    "score",
    "is_correct",
    "build_rows",
    "build_splits",
    "reward_functions",
    "sft_warm_start",
    "evaluate",
    "max_answer_chars",
]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("add", "reverse", "sort", "parity")
_LETTERS = "abcdefghij"


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of the synthetic tasks.

    Attributes:
        add_digits: the first operand of ``add`` has up to this many digits.
        add_second_digits: the second operand has up to this many digits.
        reverse_len: (min, max) letters of ``reverse``.
        sort_len: (min, max) digits of ``sort``.
        parity_len: (min, max) bits of ``parity``.
        tasks: which tasks the suite holds (a subset of :data:`TASKS`, in that order).
    """

    add_digits: int = 2
    add_second_digits: int = 1
    reverse_len: tuple[int, int] = (3, 6)
    sort_len: tuple[int, int] = (3, 5)
    parity_len: tuple[int, int] = (4, 9)
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"SuiteConfig.tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        for name in ("reverse_len", "sort_len", "parity_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"SuiteConfig.{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if self.add_digits < 1 or self.add_second_digits < 1:
            raise ValueError(f"SuiteConfig.add_digits and add_second_digits must be >= 1, got {self.add_digits}, {self.add_second_digits}")


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to draw an example and how to score a completion."""

    name: str
    description: str
    make: Callable[[random.Random, SuiteConfig], tuple[str, str]] = field(repr=False)
    reward: Callable[[str, str], float] = field(repr=False)


def _exact(pred: str, answer: str) -> float:
    return 1.0 if pred == answer else 0.0


def _positional(pred: str, answer: str) -> float:
    """Fraction of positions right, over the longer of prediction and answer (1.0 iff exact)."""
    if not pred and not answer:
        return 1.0
    hits = sum(a == b for a, b in zip(pred, answer))
    return hits / max(len(pred), len(answer))


def _make_add(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    a, b = rng.randint(0, 10**cfg.add_digits - 1), rng.randint(0, 10**cfg.add_second_digits - 1)
    return f"{a}+{b}=", str(a + b)


def _make_reverse(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(*cfg.reverse_len)))
    return f"rev {word}:", word[::-1]


def _make_sort(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(*cfg.sort_len)))
    return f"sort {digits}:", "".join(sorted(digits))


def _make_parity(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    bits = "".join(rng.choice("01") for _ in range(rng.randint(*cfg.parity_len)))
    return f"par {bits}?", "yes" if bits.count("1") % 2 == 0 else "no"


_SPECS: dict[str, TaskSpec] = {
    "add": TaskSpec("add", "two-number addition, short exact answer, sparse 0/1 reward", _make_add, _exact),
    "reverse": TaskSpec("reverse", "string reversal, long output, per-position partial credit", _make_reverse, _positional),
    "sort": TaskSpec("sort", "sort a digit string, medium output, sparse 0/1 reward", _make_sort, _exact),
    "parity": TaskSpec("parity", "yes/no: even number of 1 bits? 0/1 reward, 50% by chance", _make_parity, _exact),
}


def task_specs(config: SuiteConfig | None = None) -> dict[str, TaskSpec]:
    """The suite's tasks in order, ``{name: TaskSpec}``."""
    cfg = config or SuiteConfig()
    return {name: _SPECS[name] for name in cfg.tasks}


def _spec(task: str) -> TaskSpec:
    try:
        return _SPECS[task]
    except KeyError:
        raise ValueError(f"unknown demo task {task!r}; the suite's tasks are {TASKS}") from None


def make_example(task: str, rng: random.Random, config: SuiteConfig | None = None) -> dict[str, str]:
    """One row ``{"prompt", "task", "answer"}`` of ``task`` drawn with ``rng``."""
    prompt, answer = _spec(task).make(rng, config or SuiteConfig())
    return {"prompt": prompt, "task": task, "answer": answer}


def _clean(completion: Any) -> str:
    if isinstance(completion, list):  # conversational format: last message's content
        completion = completion[-1]["content"] if completion else ""
    return str(completion).strip()


def score(task: str, completion: Any, answer: str) -> float:
    """Reward in [0, 1] of ``completion`` (a string, stripped) for a row of ``task``."""
    return _spec(task).reward(_clean(completion), answer)


def is_correct(task: str, completion: Any, answer: str) -> bool:
    """Exact match (the held-out accuracy criterion for every task)."""
    _spec(task)
    return _clean(completion) == answer


def max_answer_chars(config: SuiteConfig | None = None) -> int:
    """Longest possible answer of the suite, in characters (= tokens with the char tokenizer)."""
    cfg = config or SuiteConfig()
    lengths = {
        "add": max(cfg.add_digits, cfg.add_second_digits) + 1,
        "reverse": cfg.reverse_len[1],
        "sort": cfg.sort_len[1],
        "parity": 3,
    }
    return max(lengths[t] for t in cfg.tasks)


def draw_distinct(
    what: str, n: int, rng: random.Random, draw: Callable[[random.Random], tuple[str, Any]], exclude: set[str], hint: str
) -> list[Any]:
    """``n`` rows from ``draw(rng) -> (prompt key, row)`` with distinct keys not in ``exclude``.

    Raises ``ValueError`` naming ``what`` (and ``hint``, the fix) when ``200 n + 1000`` draws do not
    give ``n`` distinct prompts. Shared by the demo's suites.
    """
    seen: set[str] = set()
    rows: list[Any] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"{what}: could not draw {n} distinct prompts (only {len(rows)}); {hint}")
        key, row = draw(rng)
        if key in seen or key in exclude:
            continue
        seen.add(key)
        rows.append(row)
    return rows


def build_rows(n_per_task: int, seed: int, config: SuiteConfig | None = None, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n_per_task`` distinct rows per task (prompts not in ``exclude``), tasks interleaved.

    Raises ``ValueError`` when a task's space is too small to give that many distinct prompts.
    """
    cfg = config or SuiteConfig()
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    exclude = exclude or set()
    per_task = []
    for t_index, task in enumerate(cfg.tasks):
        rng = random.Random(f"{seed}/{task}/{t_index}")

        def draw(rng: random.Random, task: str = task) -> tuple[str, dict[str, str]]:
            row = make_example(task, rng, cfg)
            return row["prompt"], row

        per_task.append(draw_distinct(f"task {task!r}", n_per_task, rng, draw, exclude, "ask for fewer rows or enlarge the task in SuiteConfig"))
    out = [rows[i] for i in range(n_per_task) for rows in per_task]
    random.Random(f"{seed}/order").shuffle(out)
    return out


def build_splits(
    n_train_per_task: int = 256, n_eval_per_task: int = 64, seed: int = 0, config: SuiteConfig | None = None
) -> tuple[Any, Any]:
    """Train and held-out eval splits, ``datasets.Dataset`` with columns prompt/task/answer.

    The eval prompts are drawn first and excluded from train, so no eval prompt is trained on.
    """
    from datasets import Dataset

    cfg = config or SuiteConfig()
    eval_rows = build_rows(n_eval_per_task, seed=seed * 7919 + 1, config=cfg)
    train_rows = build_rows(n_train_per_task, seed=seed * 7919 + 2, config=cfg, exclude={r["prompt"] for r in eval_rows})
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows)


def task_reward_fn(
    name: str, score_fn: Callable[[str, Any, str], float], suite: str = ""
) -> Callable[..., list[float | None]]:
    """A TRL reward function ``reward_<name>(prompts, completions, task, answer, **kw)`` for one task:
    ``score_fn(name, completion, answer)`` on the task's rows, ``None`` on other tasks' rows (TRL then
    ignores the row for that function). Shared by the demo's suites (``suite`` names one in the doc)."""

    def reward_fn(
        prompts: Sequence[Any], completions: Sequence[Any], task: Sequence[str], answer: Sequence[str], **kwargs: Any
    ) -> list[float | None]:
        if not (len(completions) == len(task) == len(answer)):
            raise ValueError(
                f"reward_{name}: completions, task and answer must have the same length, got "
                f"{len(completions)}, {len(task)}, {len(answer)}"
            )
        return [score_fn(name, c, a) if t == name else None for c, t, a in zip(completions, task, answer)]

    reward_fn.__name__ = f"reward_{name}"
    reward_fn.__qualname__ = f"reward_{name}"
    reward_fn.__doc__ = f"TRL reward function of {suite + ' ' if suite else ''}task {name!r}: its score in [0, 1], None on other tasks' rows."
    return reward_fn


def reward_functions(config: SuiteConfig | None = None) -> list[Callable[..., list[float | None]]]:
    """One TRL reward function per task, named ``reward_<task>`` (TRL logs ``rewards/reward_<task>/mean``)."""
    cfg = config or SuiteConfig()
    return [task_reward_fn(t, score) for t in cfg.tasks]


def _tokenize_sft(tokenizer: Any, rows: Sequence[Mapping[str, str]]) -> list[tuple[list[int], int]]:
    """Each row as (prompt+answer+eos token ids, prompt length)."""
    out = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p + a, len(p)))
    return out


def _collate_sft(examples: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels only on answer+eos."""
    width = max(len(s) for s, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    lab = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (s, n_prompt) in enumerate(examples):
        t = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = t
        lab[i, n_prompt : len(s)] = t[n_prompt:]
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


def sft_warm_start(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Supervised warm start: AdamW on the answer tokens of prompt+answer+eos (prompt masked).

    Cosine-decayed learning rate with a 5% warm-up. Batches are drawn uniformly from ``rows``
    with a seeded generator. Returns the loss of every step (mean token cross-entropy, nats).
    ``progress(step, loss)`` is called after every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not rows:
        raise ValueError("sft_warm_start got no rows")
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(f"sft/{seed}")
    encoded = _tokenize_sft(tokenizer, rows)
    losses: list[float] = []
    for step in range(steps):
        batch = _collate_sft([encoded[rng.randrange(len(encoded))] for _ in range(batch_size)], tokenizer.pad_token_id, device)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 128) -> list[str]:
    """Greedy completions (decoded, special tokens dropped, cut at the first eos)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def score_prompts(
    model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int | None = None, batch_size: int = 128
) -> dict[str, dict[str, list[float]]]:
    """Greedy held-out scores per prompt: ``{task: {"accuracy": [0/1 …], "reward": […]}}``.

    Lists follow the dataset's row order within each task, so two models scored on the same
    dataset are paired prompt by prompt (``balancedmix.significance``).
    ``dataset`` is any sequence of rows with prompt/task/answer (a ``datasets.Dataset`` works).
    """
    rows = [dataset[i] for i in range(len(dataset))]
    if not rows:
        raise ValueError("evaluate got an empty dataset")
    if max_new_tokens is None:
        max_new_tokens = max(len(r["answer"]) for r in rows) + 2
    completions = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    scores: dict[str, dict[str, list[float]]] = {}
    for r, c in zip(rows, completions):
        task = scores.setdefault(r["task"], {"accuracy": [], "reward": []})
        task["accuracy"].append(float(is_correct(r["task"], c, r["answer"])))
        task["reward"].append(score(r["task"], c, r["answer"]))
    return scores


def summarize_scores(scores: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, float]:
    """``{"eval/accuracy/<task>", "eval/reward/<task>", "eval/accuracy/mean"}`` from :func:`score_prompts`."""
    out: dict[str, float] = {}
    for task, s in scores.items():
        out[f"eval/accuracy/{task}"] = sum(s["accuracy"]) / len(s["accuracy"])
        out[f"eval/reward/{task}"] = sum(s["reward"]) / len(s["reward"])
    out["eval/accuracy/mean"] = sum(out[f"eval/accuracy/{t}"] for t in scores) / len(scores)
    return out


def evaluate(
    model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int | None = None, batch_size: int = 128
) -> dict[str, float]:
    """Greedy held-out evaluation: ``{"eval/accuracy/<task>": exact-match rate, "eval/reward/<task>": mean reward}``.

    ``dataset`` is any sequence of rows with prompt/task/answer (a ``datasets.Dataset`` works).
    Also returns ``eval/accuracy/mean`` (unweighted mean over tasks).
    """
    return summarize_scores(score_prompts(model, tokenizer, dataset, max_new_tokens, batch_size))
