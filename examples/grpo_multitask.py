"""Multi-task GRPO with TRL and balancedmix: per-task gradient diagnostics, correction, mixture.

A tiny random-initialised causal LM and a character tokenizer are built in code, with a 3-task
verifiable dataset (``add``: "12+7=" -> "19"; ``copy``: "copy abc:" -> "abc"; ``rev``:
"rev abc:" -> "cba"; tasks of different sizes). The only change from a plain TRL GRPO script is
the trainer class and one ``BalancedConfig``::

    python examples/grpo_multitask.py                       # method=normalize + learning-progress mixture
    python examples/grpo_multitask.py --baseline            # method=sum, no schedule: plain GRPO + diagnostics
    python examples/grpo_multitask.py --plain               # trl.GRPOTrainer itself (no balancedmix)
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/grpo_multitask.py --steps 10 \
        --prompts-per-step 2 --gradient-accumulation-steps 2   # 2 processes (DDP), see below
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/grpo_multitask.py --gpu  # FSDP2, 2 GPUs

Runs on 2 CPU cores in about a minute with the defaults; writes ``<output-dir>/metrics.jsonl``
(one line per optimizer step, see docs/trl.md) and prints the per-task figures of the last step.

Under DDP each process's micro-batch must hold a single task (``per-device rows = prompts-per-step
x num-generations / gradient-accumulation-steps`` equal to ``num-generations``): a micro-batch
mixing tasks is split into per-task backwards, which DDP cannot all-reduce (docs/trl.md, Limits).
With several processes the script checks that the final parameters agree across ranks and prints
``ranks agree``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from typing import Any

__all__ = ["build_dataset", "reward_functions", "main"]

TASK_SIZES = {"add": 48, "copy": 24, "rev": 12}


def build_dataset(sizes: dict[str, int] = TASK_SIZES, seed: int = 0) -> Any:
    """Rows ``{"prompt", "task", "answer"}``; ``sizes`` prompts per task."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for task, n in sizes.items():
        for _ in range(n):
            if task == "add":
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                rows.append({"prompt": f"{a}+{b}=", "task": task, "answer": str(a + b)})
            else:
                word = "".join(rng.choice("abcdef") for _ in range(3))
                answer = word if task == "copy" else word[::-1]
                rows.append({"prompt": f"{task} {word}:", "task": task, "answer": answer})
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def _score(completion: str, answer: str) -> float:
    """1 for the exact answer at the start of the completion; otherwise partial credit in [0, 0.5]
    over its first ``len(answer)`` characters: a quarter for the fraction of the answer's kind
    (digits / letters), a quarter for the fraction in the answer's alphabet (a dense signal a
    random-init model can climb)."""
    text = re.sub(r"\s", "", completion)
    if text.startswith(answer):
        return 1.0
    head = text[: len(answer)]
    kind = str.isdigit if answer.isdigit() else str.isalpha
    return 0.25 * (sum(kind(ch) for ch in head) + sum(ch in answer for ch in head)) / len(answer)


def reward_functions() -> list[Any]:
    """One verifiable reward function per task; each returns None for the other tasks' rows."""

    def make(task_name: str) -> Any:
        def reward(completions: list[str], task: list[str], answer: list[str], **kwargs: Any) -> list[float | None]:
            return [_score(c, a) if t == task_name else None for c, t, a in zip(completions, task, answer)]

        reward.__name__ = f"reward_{task_name}"
        return reward

    return [make(t) for t in TASK_SIZES]


def build_schedule(name: str) -> Any:
    from balancedmix import schedules

    if name == "none":
        return None
    if name == "learning_progress":
        return schedules.LearningProgress()
    if name == "gradient_share":
        return schedules.GradientShare()
    if name == "temperature":
        return schedules.Temperature(2.0)
    raise ValueError(f"unknown schedule {name!r}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--method", default="normalize", help="balancedmix method (sum, normalize, pcgrad, ...)")
    parser.add_argument("--schedule", default="learning_progress", choices=["none", "learning_progress", "gradient_share", "temperature"])
    parser.add_argument("--baseline", action="store_true", help="method=sum, no schedule: plain GRPO, with per-task diagnostics")
    parser.add_argument("--plain", action="store_true", help="use trl.GRPOTrainer itself (no balancedmix)")
    parser.add_argument("--output-dir", default="runs/grpo_multitask")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2)
    parser.add_argument("--max-completion-length", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gpu", action="store_true",
        help="train on the GPUs (needed for accelerate's FSDP2 plugin: examples/accelerate_fsdp2.yaml); default: CPU",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from trl import GRPOConfig, GRPOTrainer

    from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm
    from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, hidden_size=args.hidden_size, num_layers=2, seed=args.seed)
    rows_per_step = args.prompts_per_step * args.num_generations
    if rows_per_step % args.gradient_accumulation_steps:
        parser.error("prompts-per-step x num-generations must be divisible by gradient-accumulation-steps")
    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=rows_per_step // args.gradient_accumulation_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        logging_steps=5,
        seed=args.seed,
        use_cpu=not args.gpu,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    common = dict(
        model=model,
        reward_funcs=reward_functions(),
        args=config,
        train_dataset=build_dataset(seed=args.seed),
        processing_class=tokenizer,
    )
    if args.plain:
        trainer = GRPOTrainer(**common)
    else:
        method, schedule = ("sum", "none") if args.baseline else (args.method, args.schedule)
        balanced = BalancedConfig(task_key="task", method=method, schedule=build_schedule(schedule), log_dir=args.output_dir)
        trainer = BalancedGRPOTrainer(**common, balanced=balanced)
    trainer.train()

    last = getattr(trainer, "last_balanced_metrics", None) or {}
    if trainer.accelerator.num_processes > 1:
        import torch

        # FSDP2: the parameters are DTensor shards; compare the full tensors
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in trainer.model.parameters()]
        flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in full])
        fingerprint = torch.stack([flat.sum(), flat.square().sum()]).to(trainer.accelerator.device)
        every = trainer.accelerator.gather(fingerprint.unsqueeze(0)).cpu()  # [processes, 2]
        if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-9, atol=0.0):
            raise RuntimeError(f"parameters differ across ranks after training: {every.tolist()}")
        if trainer.accelerator.is_main_process:
            print(f"ranks agree: identical parameters on {trainer.accelerator.num_processes} processes")
    if trainer.accelerator.is_main_process:
        tasks = list(TASK_SIZES)
        for task in tasks:
            fields = [("n", f"num_samples/{task}"), ("reward", f"reward/{task}/mean"), ("|g|", f"grad_norm/{task}"),
                      ("share", f"update_share/{task}"), ("coef", f"coef/{task}")]
            print(f"{task:5s} " + "  ".join(f"{label} {last[key]:.3f}" for label, key in fields if key in last))
        if last:
            print(json.dumps({"metrics": getattr(trainer, "metrics_path", None), "steps": trainer.state.global_step}))
    return last


if __name__ == "__main__":
    main()
