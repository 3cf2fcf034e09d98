"""``balancedmix grpo``: TRL's ``trl grpo`` script with :class:`BalancedGRPOTrainer` and the balancedmix fields.

Same contract as ``trl grpo`` (``trl/scripts/grpo.py``): a YAML recipe (``--config``) and/or
command-line flags for every ``GRPOScriptArguments`` field (``dataset_name``, ``dataset_config``,
``dataset_train_split``, ``dataset_test_split``, ``reward_funcs`` by registry name or dotted import
path, ``reward_model_name_or_path``), every ``ModelConfig`` field (``model_name_or_path``, the
PEFT flags ``use_peft``, ``lora_r``, ``lora_alpha``, ``lora_target_modules``...), every
``DatasetMixtureConfig`` field (``datasets``) and every ``GRPOConfig`` field, plus the
``balanced_*`` fields of :class:`~balancedmix.integrations.config.BalancedGRPOConfig`.
Flags override the YAML. Differences from ``trl grpo``:

* ``dataset_name`` may also be a folder written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (loaded with ``datasets.load_from_disk``; a single ``Dataset`` is
  the train split);
* the run's ``run.json`` (name, method, schedule, tasks, steps, train seconds, every
  ``balanced_*`` field) is written next to ``metrics.jsonl``, so ``balancedmix report`` labels it.

Runs under ``python -m torch.distributed.run --nproc_per_node N -m balancedmix grpo ...`` and
``accelerate launch -m balancedmix grpo ...`` like any HF Trainer script.

:func:`write_tiny_assets` writes a tiny random-init model + character tokenizer and a local
multi-task dataset (no hub) for the example recipes in ``examples/recipes/`` and the tests;
:func:`suite_reward` is the matching reward function (``balancedmix.recipes.suite_reward``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["make_parser", "main", "run", "load_reward_funcs", "load_train_dataset", "write_tiny_assets", "suite_reward"]

logger = logging.getLogger(__name__)


def make_parser(prog: str | None = "balancedmix grpo") -> Any:
    """A ``TrlParser`` over ``(GRPOScriptArguments, BalancedGRPOConfig, ModelConfig, DatasetMixtureConfig)``."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser
    from trl.scripts.grpo import GRPOScriptArguments

    from .integrations.config import BalancedGRPOConfig

    return TrlParser(
        (GRPOScriptArguments, BalancedGRPOConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        description="GRPO with balancedmix (same flags and YAML recipes as `trl grpo`, plus the balanced_* fields).",
    )


def _reward_registry() -> dict[str, Any]:
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward

    return {
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    }


def load_reward_funcs(names: Sequence[str] | None, reward_model: str | None = None) -> list[Any]:
    """Reward functions from TRL's registry names or dotted import paths (``pkg.module.func``).

    The current directory is importable (as in ``trl grpo``), so a recipe can name
    ``my_rewards.correct``. Raises ``ValueError`` naming the function and the choices.
    """
    funcs: list[Any] = [reward_model] if reward_model else []
    registry = _reward_registry() if names else {}
    for name in names or []:
        if name in registry:
            funcs.append(registry[name])
            continue
        if "." not in name:
            raise ValueError(f"unknown reward function {name!r}; use one of {sorted(registry)} or a dotted import path")
        module_path, attr = name.rsplit(".", 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_path)
        except ImportError as err:
            raise ValueError(f"reward function {name!r}: cannot import module {module_path!r} ({err})") from None
        if not hasattr(module, attr):
            raise ValueError(f"reward function {name!r}: module {module_path!r} has no attribute {attr!r}")
        funcs.append(getattr(module, attr))
    if not funcs:
        raise ValueError("no reward: give reward_funcs (names or dotted paths) or reward_model_name_or_path")
    return funcs


def load_train_dataset(script_args: Any, dataset_args: Any) -> Any:
    """The ``DatasetDict`` (or dict of splits) named by the script arguments, as ``trl grpo`` loads it,
    plus local ``save_to_disk`` folders."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if dataset_args.datasets:
        from trl import get_dataset

        if script_args.dataset_name:
            logger.warning("both `datasets` and `dataset_name` are given; `datasets` is used")
        return get_dataset(dataset_args)
    name = script_args.dataset_name
    if not name:
        raise ValueError("no dataset: give dataset_name (hub name, local data folder or save_to_disk folder) or datasets")
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = load_from_disk(str(path))
        if isinstance(loaded, Dataset):
            return DatasetDict({script_args.dataset_train_split: loaded})
        return loaded
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def run(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any) -> Any:
    """Train as ``trl grpo`` does, with :class:`BalancedGRPOTrainer`; returns the trainer."""
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from .integrations.trl import BalancedGRPOTrainer

    reward_funcs = load_reward_funcs(script_args.reward_funcs, script_args.reward_model_name_or_path)
    if not model_args.model_name_or_path:
        raise ValueError("no model: give model_name_or_path (hub name or local folder)")
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    dataset = load_train_dataset(script_args, dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"dataset has no split {script_args.dataset_train_split!r} (splits: {list(dataset)}); set dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[script_args.dataset_test_split]
    trainer = BalancedGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        write_run_json(trainer, train_seconds)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return trainer


def write_run_json(trainer: Any, train_seconds: float) -> Path:
    """``<log_dir>/run.json``: what ``balancedmix report`` reads to label and compare the run."""
    args = trainer.args
    folder = Path(trainer.balanced.log_dir or args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    balanced = args.balanced_dict() if hasattr(args, "balanced_dict") else {}
    meta = {
        "name": folder.name,
        "method": trainer.balanced.method if isinstance(trainer.balanced.method, str) else repr(trainer.balanced.method),
        "schedule": balanced.get("balanced_schedule"),
        "seed": args.seed,
        "steps": int(trainer.state.global_step),
        "train_seconds": train_seconds,
        "tasks": list(trainer.task_registry.names),
        "balanced": balanced,
    }
    path = folder / "run.json"
    path.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``balancedmix grpo [--config recipe.yaml] [--flag value ...]``; returns 0 after training."""
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
        list(argv) if argv is not None else None, fail_with_unknown_args=True
    )
    run(script_args, training_args, model_args, dataset_args)
    return 0


# ---------------------------------------------------------------------------------- local assets
def suite_reward(prompts: Sequence[Any], completions: Sequence[Any], task: Sequence[str], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """Reward of the synthetic suite (``balancedmix.demo.suite``) for a model trained from scratch.

    Each row gets its task's score (:func:`balancedmix.demo.suite.score`, in [0, 1]) or, when
    higher, a dense partial credit in [0, 0.5] over the completion's first ``len(answer)``
    characters (a quarter for the fraction of the answer's kind, digits or letters, a quarter for
    the fraction in the answer's alphabet), a signal a random-init model can climb.
    """
    from .demo.suite import score

    out = []
    for c, t, a in zip(completions, task, answer):
        text = "".join(str(c[-1]["content"] if isinstance(c, list) and c else c).split())
        head = text[: len(a)]
        kind = str.isdigit if a.isdigit() else str.isalpha
        partial = 0.25 * (sum(kind(ch) for ch in head) + sum(ch in a for ch in head)) / max(len(a), 1)
        out.append(max(score(t, c, a), partial))
    return out


def write_tiny_assets(out: str | os.PathLike[str], *, n_train_per_task: int = 32, n_eval_per_task: int = 8, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> dict[str, str]:
    """Write a tiny random-init causal LM with its character tokenizer and the synthetic 4-task suite to disk.

    ``OUT/model``: ``save_pretrained`` of :func:`~balancedmix.demo.toy.build_tiny_causal_lm` and
    :func:`~balancedmix.demo.toy.build_char_tokenizer` (loadable with ``AutoModelForCausalLM`` /
    ``AutoTokenizer``); ``OUT/data``: a ``DatasetDict`` (``train``, ``test``; columns ``prompt``,
    ``task``, ``answer``) written with ``save_to_disk``. Nothing is downloaded. Returns the two paths
    (``{"model": ..., "data": ...}``), for ``model_name_or_path`` and ``dataset_name``.
    """
    from datasets import DatasetDict

    from .demo.suite import build_splits
    from .demo.toy import build_char_tokenizer, build_tiny_causal_lm

    out = Path(out)
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    model_dir, data_dir = out / "model", out / "data"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train, test = build_splits(n_train_per_task, n_eval_per_task, seed=seed)
    DatasetDict({"train": train, "test": test}).save_to_disk(str(data_dir))
    return {"model": str(model_dir), "data": str(data_dir)}
