"""Tests of the TRL GRPOTrainer integration (balancedmix.integrations.trl).

Everything runs on CPU with a tiny random-init causal LM (hidden 32, 2 layers) and a character
tokenizer built in code; completions are at most 8 tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from balancedmix.integrations.trl import (  # noqa: E402
    GROUP_IDS_KEY,
    TASK_IDS_KEY,
    TASK_REWARDS_KEY,
    BalancedConfig,
    BalancedGRPOTrainer,
)
from balancedmix.logger import read_jsonl  # noqa: E402
from balancedmix.optimizer import BalancedOptimizer  # noqa: E402
from balancedmix.tasks import MissingTaskLabelError, UnknownTaskError  # noqa: E402

TASKS = ("add", "copy", "rev")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def make_dataset(n_per_task: int = 8) -> Dataset:
    rows = []
    for i in range(n_per_task):
        rows.append({"prompt": f"{i}+{i + 1}=", "task": "add", "answer": str(2 * i + 1)})
        rows.append({"prompt": f"copy {chr(97 + i)}{chr(98 + i)}:", "task": "copy", "answer": f"{chr(97 + i)}{chr(98 + i)}"})
        rows.append({"prompt": f"rev {chr(99 + i)}a:", "task": "rev", "answer": f"a{chr(99 + i)}"})
    return Dataset.from_list(rows)


class RecordingReward:
    """A verifiable reward (answer substring, plus a task-dependent length term) that records every call."""

    __name__ = "recording_reward"

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, float]]] = []

    def __call__(self, prompts, completions, task, answer, **kwargs):
        scale = {"add": 1.0, "copy": 0.3, "rev": 3.0}
        out = [scale[t] * (float(a in c) + 0.1 * len(c)) for c, t, a in zip(completions, task, answer)]
        self.calls.append(list(zip(task, out)))
        return out


def make_args(tmp_path, **overrides) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        num_generations=4,
        max_completion_length=8,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        learning_rate=0.05,
        seed=0,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return GRPOConfig(**base)


def make_trainer(cls, tok, tmp_path, dataset=None, reward=None, **kwargs):
    args_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in GRPOConfig.__dataclass_fields__}
    return cls(
        model=build_tiny_causal_lm(tok, hidden_size=32, num_layers=2, seed=0),
        reward_funcs=reward or RecordingReward(),
        args=make_args(tmp_path, **args_kw),
        train_dataset=dataset if dataset is not None else make_dataset(),
        processing_class=tok,
        **kwargs,
    )


# ---------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    "loss_type,order_by_task,extra",
    [
        ("dapo", "auto", {}),
        ("dapo", False, {}),
        ("bnpo", "auto", {}),
        ("grpo", False, {"activation_checkpointing": True}),
        ("dapo", "auto", {"steps_per_generation": 4, "num_iterations": 2}),
    ],
    ids=["dapo-ordered", "dapo-split", "bnpo-split", "grpo-split-checkpointing", "dapo-ordered-spg4-mu2"],
)
def test_sum_method_matches_plain_grpo_trainer(tok, tmp_path, loss_type, order_by_task, extra):
    """method="sum", no schedule: same parameters as plain GRPOTrainer after 3 GRPO steps.

    Both runs use the same seed, TRL's RepeatSampler and TRL's shuffle (the integration consumes
    no random numbers), so generations are identical. The gradients differ only by float32
    rounding: re-grouping rows by task (``auto``) changes the summation order, and a split
    micro-batch runs its forward per task sub-batch (different matmul shapes). SGD is used so
    that the update is linear in the gradient (Adam's first step, g/|g|, would amplify the
    rounding of near-zero gradients); tolerance atol 1e-6 on parameters of magnitude ~1.
    One case runs with activation checkpointing (TRL's default), where each sub-batch's backward
    recomputes its own forward; one with a generation batch feeding 2 optimizer steps, reused
    twice (steps_per_generation=4 > gradient_accumulation_steps=2, num_iterations=2), where the
    re-ordering must keep each optimizer step's set of rows.
    """
    common = dict(optim="sgd", loss_type=loss_type, max_grad_norm=0.0, **extra)
    plain = make_trainer(GRPOTrainer, tok, tmp_path / "plain", **common)
    plain.train()
    # homogeneous=False: TRL's RepeatSampler, so both runs see the same prompts (auto would draw task quotas)
    balanced = make_trainer(
        BalancedGRPOTrainer, tok, tmp_path / "bal",
        balanced=BalancedConfig(method="sum", order_by_task=order_by_task, homogeneous=False), **common,
    )
    balanced.train()
    assert isinstance(balanced.optimizer.optimizer, BalancedOptimizer)
    for (name, p), q in zip(plain.model.named_parameters(), balanced.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    moved = sum((p - q).abs().sum() for p, q in zip(plain.model.parameters(), build_tiny_causal_lm(tok, hidden_size=32, seed=0).parameters()))
    assert moved > 1e-3  # training did change the parameters
    losses_plain = [h["loss"] for h in plain.state.log_history if "loss" in h]
    losses_bal = [h["loss"] for h in balanced.state.log_history if "loss" in h]
    assert losses_bal == pytest.approx(losses_plain, rel=1e-4, abs=1e-6)
    splits = [h["split_microbatches"] for h in balanced.state.log_history if "split_microbatches" in h]
    if order_by_task is False or loss_type == "bnpo":  # also with activation checkpointing (recompute per sub-batch)
        assert sum(splits) > 0  # the split path was exercised
    if order_by_task == "auto" and loss_type == "dapo":
        assert balanced._bm_reorder_reason is None
        # rows ordered by task inside each optimizer step: micro-batch i (rows [i*m, (i+1)*m)) is
        # mixed exactly when a task boundary falls strictly inside it
        m = balanced.args.per_device_train_batch_size
        for h in (h for h in balanced.state.log_history if "split_microbatches" in h):
            counts = [int(h[f"num_samples/{t}"]) for t in TASKS]
            bounds = [sum(counts[: k + 1]) for k in range(len(counts) - 1)]
            n_micro = sum(counts) // m
            expected = sum(any(i * m < c < (i + 1) * m for c in bounds) for i in range(n_micro))
            assert h["split_microbatches"] == expected


# ---------------------------------------------------------------------------------- exact split
@pytest.fixture(scope="module")
def split_setup(tok, tmp_path_factory):
    trainer = make_trainer(BalancedGRPOTrainer, tok, tmp_path_factory.mktemp("split"), optim="sgd")
    opt = trainer.create_optimizer()
    model = trainer.model
    model.train()
    rows = [dict(r) for r in make_dataset(2) for _ in range(trainer.num_generations)]  # 6 prompts x 4
    torch.manual_seed(1)
    batch = trainer._generate_and_score_completions(rows)
    assert len(set(batch[TASK_IDS_KEY].tolist())) == 3
    # shuffle the rows (as TRL does) and make old/ref log-probs differ from the current ones so
    # that ratios, clipping and the KL are not trivial
    perm = torch.randperm(len(batch[TASK_IDS_KEY]))
    batch = {k: (v[perm] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in batch.items()}
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, att, batch["completion_ids"].size(1))
    gen = torch.Generator().manual_seed(2)
    batch["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    batch["ref_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    batch["advantages"] = batch["advantages"] + 0.2 * torch.randn(batch["advantages"].shape, generator=gen)
    trainer.current_gradient_accumulation_steps = 2
    return trainer, opt, batch


LOSS_CONFIGS = {
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "sapo": dict(loss_type="sapo"),
    "cispo": dict(loss_type="cispo"),
    "vespo": dict(loss_type="vespo"),
    "grpo+kl": dict(loss_type="grpo", beta=0.1),
    "dapo+entropy_bonus": dict(loss_type="dapo", entropy_coef=0.05),
    "bnpo+top_entropy": dict(loss_type="bnpo", top_entropy_quantile=0.5),
    "grpo+off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.01),
}
LINEAR_IN_ADVANTAGE = {"grpo", "dapo", "dr_grpo", "bnpo", "luspo", "sapo", "cispo", "vespo", "grpo+off_policy_mask"}


@contextlib.contextmanager
def loss_config(trainer, loss_type, beta=0.0, entropy_coef=0.0, top_entropy_quantile=1.0,
                importance_sampling_level="token", off_policy_mask_threshold=None):
    saved = {k: getattr(trainer, k) for k in ("loss_type", "beta", "entropy_coef", "_entropy_bonus_enabled",
                                              "top_entropy_quantile", "importance_sampling_level", "off_policy_mask_threshold")}
    trainer.loss_type, trainer.beta, trainer.entropy_coef = loss_type, beta, entropy_coef
    trainer._entropy_bonus_enabled = entropy_coef != 0.0
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer.importance_sampling_level = importance_sampling_level
    trainer.off_policy_mask_threshold = off_policy_mask_threshold
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _task_buffers(opt, registry):
    rows = opt.buffers.finish()
    out = {}
    for r in rows:
        key = opt.buffers.keys[r]
        assert key[0] == "task", f"a backward was not attributed to a task: {key}"
        out[registry.name(key[1])] = opt.buffers.data[r].clone()
    return out


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_split_sums_to_unsplit_microbatch_gradient(split_setup, name):
    trainer, opt, batch = split_setup
    model = trainer.model
    params = list(opt.buffers.params)  # the buffers' flat layout follows the optimizer's parameter order
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    tasks = trainer.task_registry.names
    with loss_config(trainer, **LOSS_CONFIGS[name]):
        # reference 1: the unsplit micro-batch, TRL's own loss, one backward
        opt.zero_grad()
        GRPOTrainer._compute_loss(trainer, model, batch).backward()
        full = torch.cat([g.reshape(-1) for g in _grads(params)])
        # reference 2 (per task): full-batch forward, seed d loss / d logps restricted to the task's rows
        captured = {}
        original = trainer._get_per_token_logps_and_entropies

        def capture(*a, **kw):
            out = GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **kw)
            captured.setdefault("out", out)
            return out

        trainer._get_per_token_logps_and_entropies = capture
        try:
            loss = GRPOTrainer._compute_loss(trainer, model, batch)
        finally:
            del trainer._get_per_token_logps_and_entropies
        assert trainer._get_per_token_logps_and_entropies.__func__ is original.__func__
        logps, ent, _ = captured["out"]
        leaves = [logps] + ([ent] if ent is not None and ent.requires_grad else [])
        seeds = torch.autograd.grad(loss, leaves, allow_unused=True)
        ref_task = {}
        for t_index, task in enumerate(tasks):
            rows = (batch[TASK_IDS_KEY] == t_index).to(logps.dtype).unsqueeze(1)
            g = torch.autograd.grad(
                sum((x * s * rows).sum() for x, s in zip(leaves, seeds) if s is not None), params, retain_graph=True, allow_unused=True
            )
            ref_task[task] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)])
        del loss, leaves, seeds
        opt.zero_grad()

        # the integration: mixed micro-batch -> per-task sub-batches
        splits_before = trainer._bm_split_count
        with contextlib.ExitStack() as stack:
            trainer._bm_stack = stack
            try:
                out = trainer.compute_loss(model, batch)
                trainer.accelerator.backward(out)
            finally:
                trainer._bm_stack = None
        assert trainer._bm_split_count == splits_before + 1
        total = torch.cat([g.reshape(-1) for g in _grads(params)])
        per_task = _task_buffers(opt, trainer.task_registry)
        opt.zero_grad()

    assert set(per_task) == set(tasks)
    scale = full.abs().max()
    assert scale > 0
    atol = 2e-5 * float(scale)
    torch.testing.assert_close(total, full, rtol=0, atol=atol)  # p.grad: the plain total
    torch.testing.assert_close(sum(per_task.values()), full, rtol=0, atol=atol)  # Σ_t G_t = unsplit gradient
    for task in tasks:
        torch.testing.assert_close(per_task[task], ref_task[task], rtol=0, atol=atol, msg=lambda m: f"{task}: {m}")
    if name in LINEAR_IN_ADVANTAGE:
        # reference 3: a loss linear in the advantages -> task t's share is the loss with the other rows' advantages zeroed
        for t_index, task in enumerate(tasks):
            masked = dict(batch, advantages=batch["advantages"] * (batch[TASK_IDS_KEY] == t_index))
            g = torch.autograd.grad(_loss_with(trainer, name, model, masked), params, allow_unused=True)
            ref = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)])
            torch.testing.assert_close(per_task[task], ref, rtol=0, atol=atol, msg=lambda m: f"{task}: {m}")
        opt.zero_grad()


def _loss_with(trainer, name, model, inputs):
    with loss_config(trainer, **LOSS_CONFIGS[name]):
        return GRPOTrainer._compute_loss(trainer, model, inputs)


# ---------------------------------------------------------------------------------- metrics
def test_metrics_in_log_history_and_jsonl(tok, tmp_path):
    reward = RecordingReward()
    log_dir = tmp_path / "logs"
    trainer = make_trainer(
        BalancedGRPOTrainer, tok, tmp_path, reward=reward, max_steps=3,
        balanced=BalancedConfig(method="normalize", log_dir=str(log_dir), estimator="split"),
    )
    trainer.train()
    records = read_jsonl(log_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    history = [h for h in trainer.state.log_history if "grad_norm/total" in h]
    assert [h["step"] for h in history] == [1, 2, 3]

    # the sampler's composition: with steps_per_generation == gradient_accumulation_steps and
    # num_iterations == 1, optimizer step j trains on exactly the j-th chunk of the sampler
    sampler = trainer._get_train_sampler(trainer.train_dataset)
    indices = list(sampler)
    gen_rows = trainer.args.generation_batch_size
    chunk_len = gen_rows * trainer.args.steps_per_generation * trainer.num_iterations
    task_col = trainer.train_dataset["task"]
    for j, (rec, hist) in enumerate(zip(records, history)):
        chunk = indices[j * chunk_len : j * chunk_len + gen_rows]
        expected = Counter(task_col[i] for i in chunk)
        for task in TASKS:
            assert rec[f"num_samples/{task}"] == expected.get(task, 0)
            assert hist[f"num_samples/{task}"] == expected.get(task, 0)
        # reward statistics against the rewards the reward function returned for that generation
        got = reward.calls[j]
        for task in TASKS:
            vals = [r for t, r in got if t == task]
            if not vals:
                assert f"reward/{task}/mean" not in rec
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
            assert rec[f"reward/{task}/mean"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
            assert rec[f"reward/{task}/std"] == pytest.approx(std, rel=1e-4, abs=1e-6)
            for key in (f"grad_norm/{task}", f"update_share/{task}", f"coef/{task}", f"advantage/{task}/mean",
                        f"advantage/{task}/abs_mean", f"completion_length/{task}/mean"):
                assert key in rec and key in hist, key
            assert 0 < rec[f"completion_length/{task}/mean"] <= 8
            assert hist[f"reward/{task}/mean"] == pytest.approx(rec[f"reward/{task}/mean"], rel=1e-6)
        for key in ("loss", "step_time", "learning_rate", "grad_norm/total", "grad_norm/update", "grad_scale", "buffer_bytes"):
            assert key in rec, key
        assert hist["loss"] == pytest.approx(rec["loss"], rel=1e-5, abs=1e-7)
        assert rec["step_time"] > 0
        # update shares sum to one; the Trainer's pre-clip grad_norm is the total of the task gradients
        assert sum(rec[f"update_share/{t}"] for t in TASKS if f"update_share/{t}" in rec) == pytest.approx(1.0, abs=1e-6)
        assert hist["grad_norm"] == pytest.approx(rec["grad_norm/total"], rel=1e-4)
    # method="normalize" did change the coefficients
    assert any(abs(r[f"coef/{t}"] - 1.0) > 1e-3 for r in records for t in TASKS if f"coef/{t}" in r)


# ---------------------------------------------------------------------------------- optimizer paths and errors
def test_wraps_user_optimizers(tok, tmp_path):
    model = build_tiny_causal_lm(tok, hidden_size=32, seed=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = BalancedGRPOTrainer(
        model=model, reward_funcs=RecordingReward(), args=make_args(tmp_path), train_dataset=make_dataset(),
        processing_class=tok, optimizers=(sgd, None), method="mean",
    )
    opt = trainer.create_optimizer()
    assert isinstance(opt, BalancedOptimizer) and opt.optimizer is sgd and opt.method_name == "mean"
    assert opt.registry.names == trainer.task_registry.names == TASKS

    trainer2 = make_trainer(
        BalancedGRPOTrainer, tok, tmp_path / "b", optimizer_cls_and_kwargs=(torch.optim.Adagrad, {"lr": 0.01})
    )
    opt2 = trainer2.create_optimizer()
    assert isinstance(opt2, BalancedOptimizer) and isinstance(opt2.optimizer, torch.optim.Adagrad)
    with pytest.raises(RuntimeError, match="optimizer_cls_and_kwargs"):
        BalancedGRPOTrainer(
            model=build_tiny_causal_lm(tok, hidden_size=32), reward_funcs=RecordingReward(), args=make_args(tmp_path / "c"),
            train_dataset=make_dataset(), processing_class=tok,
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
        )


def test_missing_task_column_is_a_clear_error(tok, tmp_path):
    ds = make_dataset().remove_columns("task")
    with pytest.raises(MissingTaskLabelError, match=r"no task column 'task'.*prompt"):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path, dataset=ds)


def test_undeclared_dataset_task_is_a_clear_error(tok, tmp_path):
    with pytest.raises(UnknownTaskError, match=r"\['rev'\].*not declared"):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path, balanced=BalancedConfig(tasks=["add", "copy"]))


def test_declared_task_order_is_used(tok, tmp_path):
    trainer = make_trainer(BalancedGRPOTrainer, tok, tmp_path, tasks=["rev", "add", "copy", "unused"])
    assert trainer.task_registry.names == ("rev", "add", "copy", "unused")


def test_unknown_row_task_at_generation_is_a_clear_error(tok, tmp_path):
    trainer = make_trainer(BalancedGRPOTrainer, tok, tmp_path)
    rows = [{"prompt": "1+1=", "task": "add", "answer": "2"}] * 2 + [{"prompt": "x", "task": "poetry", "answer": "y"}] * 2
    with pytest.raises(UnknownTaskError, match="poetry"):
        trainer._generate_and_score_completions(rows)
    with pytest.raises(MissingTaskLabelError, match="row 1"):
        trainer._generate_and_score_completions([{"prompt": "1+1=", "task": "add", "answer": "2"}, {"prompt": "x", "answer": "y"}])


def test_config_validation(tok, tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns"):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="bnpo"):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path / "b", loss_type="bnpo", order_by_task=True)
    with pytest.raises(ValueError, match="estimator"):
        BalancedConfig(estimator="nope")
    with pytest.raises(TypeError, match="BalancedConfig"):
        make_trainer(BalancedGRPOTrainer, tok, tmp_path / "c", balanced={"method": "sum"})


def test_task_ids_survive_shuffle_and_split(tok, tmp_path):
    """The injected labels stay aligned with their rows through TRL's shuffle/split and our re-order."""
    trainer = make_trainer(BalancedGRPOTrainer, tok, tmp_path)
    trainer.model.train()
    dl_batch = [dict(r) for r in make_dataset(2) for _ in range(4)][:16]
    trainer._step = 0
    first = trainer._prepare_inputs(dl_batch)
    buffered = trainer._buffered_inputs
    assert first is buffered[0]
    prompt_to_task = {}
    for r in dl_batch:
        prompt_to_task[r["prompt"]] = r["task"]
    for mb in buffered:
        ids = mb[TASK_IDS_KEY].tolist()
        assert ids == sorted(ids)  # re-ordered by task inside the optimizer step's window
        prompts = tok.batch_decode(mb["prompt_ids"], skip_special_tokens=True)
        for p, t in zip(prompts, ids):
            assert prompt_to_task[p] == trainer.task_registry.name(t)
        assert TASK_REWARDS_KEY in mb
    assert sum(len(mb[TASK_IDS_KEY]) for mb in buffered) == 16
    # GRPO groups stay whole and contiguous: per_device_train_batch_size (8) is a multiple of
    # num_generations (4), so no group straddles two micro-batches (split-half independence)
    seen: set[int] = set()
    for mb in buffered:
        groups = mb[GROUP_IDS_KEY].tolist()
        runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
        assert len(runs) == len(set(runs)) and not seen & set(runs)
        assert all(groups.count(g) == 4 for g in runs)
        seen |= set(runs)
        prompts = tok.batch_decode(mb["prompt_ids"], skip_special_tokens=True)
        assert all(len({p for p, g in zip(prompts, groups) if g == gid}) == 1 for gid in runs)


# ---------------------------------------------------------------------------------- mixture schedule
def test_schedule_uses_mixture_sampler_and_receives_metrics(tok, tmp_path):
    from balancedmix import schedules
    from balancedmix.sampler import MixtureSampler

    class Recording(schedules.Fixed):
        def __init__(self, weights):
            super().__init__(weights)
            self.seen = []

        def update(self, metrics):
            self.seen.append(dict(metrics))

    weights = {"add": 3.0, "copy": 1.0, "rev": 0.0}
    schedule = Recording(weights)
    log_dir = tmp_path / "logs"
    trainer = make_trainer(
        BalancedGRPOTrainer, tok, tmp_path, max_steps=3, balanced=BalancedConfig(method="sum", schedule=schedule, log_dir=str(log_dir))
    )
    trainer.train()
    assert isinstance(trainer.mixture_sampler, MixtureSampler)
    records = read_jsonl(log_dir / "metrics.jsonl")
    # the same sampler, rebuilt: its batches are the composition the log must show
    unit = trainer.mixture_sampler.quota_unit  # homogeneous="auto": quotas in whole micro-batches (2 prompts)
    assert unit == 2
    ref = MixtureSampler(
        trainer.train_dataset, task_key="task", weights=weights, prompts_per_batch=trainer.args.generation_batch_size // 4,
        num_generations=4, repeat_count=trainer.args.steps_per_generation, seed=0, tasks=list(TASKS), quota_unit=unit,
    )
    indices = list(iter(ref))
    task_col = trainer.train_dataset["task"]
    for j, rec in enumerate(records):
        chunk = indices[j * ref.batch_length : j * ref.batch_length + trainer.args.generation_batch_size]
        expected = Counter(task_col[i] for i in chunk)
        assert expected["rev"] == 0 and expected["add"] % (4 * unit) == 0 and expected["copy"] % (4 * unit) == 0
        for task in TASKS:
            assert rec[f"num_samples/{task}"] == expected.get(task, 0)
        assert rec["mixture/weight/add"] == pytest.approx(0.75)
    # the callback fed the schedule one record per step, with diagnostics and reward means
    assert len(schedule.seen) == 3
    assert all("update_share/add" in m and "reward/add/mean" in m and "reward/rev/mean" not in m for m in schedule.seen)
    assert schedule.seen[-1]["reward/add/mean"] == records[-1]["reward/add/mean"]
    # 3 batches x 2 units at weights 3:1: the quota gives add ceil/floor(0.75 x 6) units, within one unit
    added = sum(rec["num_samples/add"] for rec in records) / (4 * unit)
    assert 4 <= added <= 5 and all(rec["split_microbatches"] == 0 for rec in records)


# ---------------------------------------------------------------------------------- example script
@pytest.mark.slow
def test_example_script_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_multitask.py"
    spec = importlib.util.spec_from_file_location("grpo_multitask", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "run"
    last = module.main(["--steps", "3", "--output-dir", str(out), "--prompts-per-step", "6"])
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 3
    assert set(k for k in last if k.startswith("coef/")) <= {f"coef/{t}" for t in module.TASK_SIZES}
    assert any(k.startswith("mixture/weight/") for k in records[-1])
    base = module.main(["--steps", "2", "--output-dir", str(tmp_path / "base"), "--baseline", "--prompts-per-step", "6"])
    assert all(base[k] == 1.0 for k in base if k.startswith("coef/"))
    module.main(["--steps", "1", "--output-dir", str(tmp_path / "plain"), "--plain", "--prompts-per-step", "6"])


def test_mixin_on_a_user_subclass(tok, tmp_path):
    from balancedmix.integrations import BalancedGRPOMixin

    class MyGRPOTrainer(GRPOTrainer):
        calls = 0

        def _generate_and_score_completions(self, inputs):
            MyGRPOTrainer.calls += 1
            return super()._generate_and_score_completions(inputs)

    class MyBalanced(BalancedGRPOMixin, MyGRPOTrainer):
        pass

    trainer = make_trainer(MyBalanced, tok, tmp_path, max_steps=1, method="mean", log_dir=str(tmp_path / "logs"))
    trainer.train()
    assert MyGRPOTrainer.calls == 1
    (record,) = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    present = [t for t in TASKS if record[f"num_samples/{t}"] > 0]
    assert all(record[f"coef/{t}"] == pytest.approx(1 / len(present)) for t in present)


# ----------------------------------------------------------------------------- 2 processes (DDP) end to end
@pytest.mark.slow
@pytest.mark.parametrize(
    "prompts, gens", [(2, 4), (4, 2)], ids=["single-task-microbatches", "mixed-microbatches-split"]
)
def test_grpo_example_two_processes_agree(tmp_path, prompts, gens):
    """``examples/grpo_multitask.py`` under ``torchrun --nproc_per_node 2`` on CPU (DDP): the main
    process's JSONL has every task's keys at every step, ``num_samples`` counts both ranks' rows
    (the global generation batch), and the final parameters agree across ranks. Micro-batches hold
    one GRPO group (per-device rows = num_generations), so each is single-task (see docs/trl.md)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps, accum, world = 3, 2, 2
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
        "examples/grpo_multitask.py", "--steps", str(steps), "--hidden-size", "32", "--prompts-per-step", str(prompts),
        "--num-generations", str(gens), "--gradient-accumulation-steps", str(accum), "--max-completion-length", "4",
        "--output-dir", str(out),
    ]  # fmt: skip
    mixed = gens < prompts * gens // accum  # micro-batches of 4 rows, groups of 2: they can mix tasks
    if mixed:
        cmd += ["--homogeneous", "false"]  # keep the mixed micro-batches (the split path under DDP)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(root))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
    log = f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    metrics = out / "metrics.jsonl"
    assert metrics.exists(), log
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), log  # main process only: one line per step
    global_rows = prompts * gens * world  # prompts-per-step x num-generations on each of the 2 ranks
    tasks = ("add", "copy", "rev")
    for r in records:
        for t in tasks:
            for key in (f"num_samples/{t}", f"num_microbatches/{t}", f"mixture/weight/{t}"):
                assert key in r, (r["step"], key)
            if r[f"num_samples/{t}"] > 0:
                for key in (f"grad_norm/{t}", f"update_share/{t}", f"coef/{t}", f"reward/{t}/mean"):
                    assert key in r, (r["step"], key)
        assert sum(r[f"num_samples/{t}"] for t in tasks) == global_rows, r
        assert sum(r.get(f"update_share/{t}", 0.0) for t in tasks) == pytest.approx(1.0, abs=1e-5)
    assert "ranks agree" in proc.stdout, log
    if mixed:
        assert any(r.get("split_microbatches", 0) > 0 for r in records), "no micro-batch was split: the case is not covered"
    # torch/gloo can abort (SIGABRT) while tearing down after a complete run; anything else is a failure
    if proc.returncode != 0:
        assert "SIGABRT" in proc.stderr or "Signal 6" in proc.stderr or "exitcode  : -6" in proc.stderr, log
