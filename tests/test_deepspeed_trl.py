"""BalancedGRPOTrainer under DeepSpeed (``GRPOConfig(deepspeed=<dict>, use_cpu=True)``), 2 gloo processes.

Each rank builds the trainers inside the test harness's process group (fork: transformers and
TRL are imported once, here). Micro-batches hold one GRPO group (per-device rows =
``num_generations``), so each is single-task.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'balancedmix[deepspeed]' with DS_BUILD_OPS=0)")
pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer  # noqa: E402
from dist_harness import run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TASKS = ("add", "copy", "rev")
STEPS = 2


def make_dataset(n_per_task: int = 8) -> Dataset:
    rows = []
    for i in range(n_per_task):
        rows.append({"prompt": f"{i}+{i + 1}=", "task": "add", "answer": str(2 * i + 1)})
        rows.append({"prompt": f"copy {chr(97 + i)}{chr(98 + i)}:", "task": "copy", "answer": f"{chr(97 + i)}{chr(98 + i)}"})
        rows.append({"prompt": f"rev {chr(99 + i)}a:", "task": "rev", "answer": f"a{chr(99 + i)}"})
    return Dataset.from_list(rows)


def reward(prompts, completions, task, answer, **kwargs):
    scale = {"add": 1.0, "copy": 0.3, "rev": 3.0}
    return [scale[t] * (float(a in c) + 0.1 * len(c)) for c, t, a in zip(completions, task, answer)]


def ds_dict(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
    }


def _trainer_worker(rank: int, world: int, stage: int, tmp: str, methods: list[str | None]) -> dict:
    from accelerate.state import AcceleratorState

    out = {}
    tok = build_char_tokenizer()
    for method in methods:
        AcceleratorState._reset_state(True)
        args = GRPOConfig(
            output_dir=os.path.join(tmp, f"{method}-{rank}"), use_cpu=True, deepspeed=ds_dict(stage), report_to="none",
            save_strategy="no", num_generations=4, max_completion_length=4, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, max_steps=STEPS, logging_steps=1, learning_rate=0.05, seed=0,
            dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False, max_grad_norm=0.0, optim="sgd",
        )  # fmt: skip
        model = build_tiny_causal_lm(tok, hidden_size=32, num_layers=2, seed=0)
        kwargs = dict(model=model, reward_funcs=reward, args=args, train_dataset=make_dataset(), processing_class=tok)
        if method is None:
            trainer = GRPOTrainer(**kwargs)
        else:
            trainer = BalancedGRPOTrainer(**kwargs, balanced=BalancedConfig(method=method, write_jsonl=False))
        try:
            trainer.train()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            out[str(method)] = {"error": f"{type(exc).__name__}: {exc}", "global_step": trainer.state.global_step}
            continue
        engine = trainer.model_wrapped
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                params = [p.detach().clone() for p in engine.module.parameters()]
        else:
            params = [p.detach().clone() for p in engine.module.parameters()]
        res = {"params": params, "log": [dict(h) for h in trainer.state.log_history]}
        if method is not None:
            res["mode"] = trainer.balanced_optimizer.distributed.last_mode
            res["diags"] = trainer.balanced_optimizer.diagnostics()
        out[str(method)] = res
    return out


def test_grpo_trainer_zero1_trains_and_sum_equals_plain(tmp_path) -> None:
    """ZeRO-1 captures local gradients, so ranks may train different tasks at one micro-step."""
    results = run_ranks(_trainer_worker, 2, 1, str(tmp_path), [None, "sum", "normalize"], timeout=300)
    for res in results:
        for key in ("None", "sum", "normalize"):
            assert "error" not in res[key], res[key]
        assert res["sum"]["mode"] == res["normalize"]["mode"] == "zero1"
        # SGD (linear in the gradient) and atol 1e-6 as in test_trl.py: re-grouping rows by task
        # changes the float32 summation order only
        for got, want in zip(res["sum"]["params"], res["None"]["params"]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not all(torch.equal(a, b) for a, b in zip(res["normalize"]["params"], res["sum"]["params"]))
        d = res["normalize"]["diags"]
        present = [t for t in TASKS if f"grad_norm/{t}" in d]
        assert present and math.isclose(sum(d[f"update_share/{t}"] for t in present), 1.0, abs_tol=1e-5)
    for key in ("sum", "normalize"):
        assert results[0][key]["diags"] == results[1][key]["diags"]
        for a, b in zip(results[0][key]["params"], results[1][key]["params"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_trainer_zero23_refuses_rank_misaligned_tasks_on_every_rank(tmp_path, stage: int) -> None:
    """ZeRO-2/3 reduce every micro-step: the GRPO path does not (yet) give every rank the same task at the
    same micro-step, so the first misaligned micro-step raises the same error on every rank, before its
    backward and before any optimizer step."""
    results = run_ranks(_trainer_worker, 2, stage, str(tmp_path), ["normalize"], timeout=300)
    errors = [res["normalize"].get("error") for res in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert errors[0].startswith("DistributedStateError") and f"ZeRO-{stage}" in errors[0]
    assert all(res["normalize"]["global_step"] == 0 for res in results)
