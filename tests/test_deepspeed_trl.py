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

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer  # noqa: E402
from dist_harness import run_ranks  # noqa: E402
from test_trl import make_dataset  # noqa: E402 - the same three-task dataset as the TRL tests

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TASKS = ("add", "copy", "rev")
STEPS = 2


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


def _trainer_worker(rank: int, world: int, stage: int, tmp: str, methods: list[str | None], homogeneous: bool | str = "auto") -> dict:
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
            config = BalancedConfig(method=method, write_jsonl=False, homogeneous=homogeneous)
            trainer = BalancedGRPOTrainer(**kwargs, balanced=config)
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
    # homogeneous=False: TRL's sampler, the same prompts as the plain run (and micro-batches that mix tasks)
    results = run_ranks(_trainer_worker, 2, 1, str(tmp_path), [None, "sum", "normalize"], False, timeout=300)
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
    """ZeRO-2/3 reduce every micro-step: with homogeneous=False (TRL's sampler) the ranks' tasks at a
    micro-step differ, so the first misaligned micro-step raises the same error on every rank, before its
    backward and before any optimizer step."""
    results = run_ranks(_trainer_worker, 2, stage, str(tmp_path), ["normalize"], False, timeout=300)
    errors = [res["normalize"].get("error") for res in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert errors[0].startswith("DistributedStateError") and f"ZeRO-{stage}" in errors[0]
    assert all(res["normalize"]["global_step"] == 0 for res in results)


@pytest.fixture(scope="module")
def zero1_homogeneous(tmp_path_factory) -> list[dict]:
    """The ZeRO-1 reference (local gradients, checked against plain TRL above) on the homogeneous sampler."""
    tmp = tmp_path_factory.mktemp("zero1")
    return run_ranks(_trainer_worker, 2, 1, str(tmp), ["sum", "normalize"], "auto", timeout=300)


@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_trainer_zero23_trains_with_homogeneous_micro_batches(tmp_path, stage: int, zero1_homogeneous) -> None:
    """With homogeneous="auto" (the default) the task quotas come in whole micro-batches, the same on both
    ranks (4 rows per device batch = one group of 4, 2 accumulation steps), so every micro-step runs one
    task on every rank and ZeRO-2/3 train: ranks agree on every figure and parameter, and ``sum`` and
    ``normalize`` equal the ZeRO-1 run on the same batches (ZeRO-1 reads local gradients, ZeRO-2/3 the
    reduced partitions: the same sums in another float32 order, hence atol 1e-6 on parameters after SGD
    and rtol 1e-5 on the per-task figures)."""
    results = run_ranks(_trainer_worker, 2, stage, str(tmp_path), ["sum", "normalize"], "auto", timeout=300)
    for res, ref in zip(results, zero1_homogeneous):
        for method in ("sum", "normalize"):
            assert "error" not in res[method], res[method]
            assert "error" not in ref[method], ref[method]
            assert res[method]["mode"] == f"zero{stage}" and ref[method]["mode"] == "zero1"
            for got, want in zip(res[method]["params"], ref[method]["params"]):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            d, d_ref = res[method]["diags"], ref[method]["diags"]
            for key in (k for k in d_ref if k.startswith(("grad_norm/", "update_share/", "coef/"))):
                assert math.isclose(d[key], d_ref[key], rel_tol=1e-5, abs_tol=1e-7), (method, key, d[key], d_ref[key])
        d = res["normalize"]["diags"]
        present = [t for t in TASKS if f"grad_norm/{t}" in d]
        assert present and math.isclose(sum(d[f"update_share/{t}"] for t in present), 1.0, abs_tol=1e-5)
        assert not all(torch.equal(a, b) for a, b in zip(res["normalize"]["params"], res["sum"]["params"]))
    for method in ("sum", "normalize"):
        assert results[0][method]["diags"] == results[1][method]["diags"]
        for a, b in zip(results[0][method]["params"], results[1][method]["params"]):
            assert torch.equal(a, b)
