"""``BalancedGRPOTrainer.train(resume_from_checkpoint=...)`` (issue 14, item 1).

A resumed run must keep the steps before the checkpoint in ``metrics.jsonl`` (append after the
checkpoint's step, dropping the lines past it, which the resumed run redoes), and restore the
``MixtureSampler`` and schedule state from the checkpoint, so that it replays the uninterrupted
run exactly: same prompts per step, same schedule weights, same per-step metrics.

Same tiny in-code model and data as tests/test_trl.py; CPU.
"""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("trl")

from balancedmix import schedules  # noqa: E402
from balancedmix.demo.toy import build_char_tokenizer  # noqa: E402
from balancedmix.integrations.trl import BALANCED_STATE_NAME, BalancedConfig, BalancedGRPOTrainer  # noqa: E402
from balancedmix.logger import read_jsonl, truncate_after_step  # noqa: E402
from test_trl import make_trainer  # noqa: E402

VOLATILE = {"time", "step_time"}  # wall-clock figures


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


class Recording(BalancedGRPOTrainer):
    """Records the prompts of every generation batch, with the global step they were trained at."""

    def _generate_and_score_completions(self, inputs):
        self.prompts_by_step = getattr(self, "prompts_by_step", {})
        self.prompts_by_step.setdefault(self.state.global_step + 1, []).append([r["prompt"] for r in inputs])
        return super()._generate_and_score_completions(inputs)


def run(tok, out, resume=None, **kw):
    schedule = schedules.GradientShare(rate=1.0, smoothing=0.0, max_step=4.0)
    trainer = make_trainer(
        Recording, tok, out, max_steps=8, save_strategy="steps", save_steps=3, optim="adamw_torch",
        balanced=BalancedConfig(method="normalize", schedule=schedule), **kw,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, schedule


def assert_records_equal(got, want):
    assert got["step"] == want["step"]
    keys = (set(got) | set(want)) - VOLATILE
    for key in sorted(keys):
        a, b = got.get(key), want.get(key)
        if isinstance(a, float) and isinstance(b, float):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"step {got['step']} {key}: {a} vs {b}"
        else:
            assert a == b, f"step {got['step']} {key}: {a!r} vs {b!r}"


@pytest.mark.slow
def test_resume_appends_to_the_log_and_replays_the_mixture_exactly(tok, tmp_path):
    # the uninterrupted run: 8 steps, checkpoints at 3 and 6 (one sampler epoch is 6 steps)
    full, full_schedule = run(tok, tmp_path)
    log = tmp_path / "out" / "metrics.jsonl"
    reference = read_jsonl(log)
    assert [r["step"] for r in reference] == list(range(1, 9))
    ckpt = tmp_path / "out" / "checkpoint-3"
    saved = json.loads((ckpt / BALANCED_STATE_NAME).read_text())
    assert saved["global_step"] == 3 and saved["sampler"] is not None
    assert saved["sampler"]["schedule"]["type"] == "GradientShare"
    assert saved["sampler"]["schedule"]["num_updates"] == 3
    weights_after_3 = saved["sampler"]["schedule"]["weights"]
    assert max(weights_after_3.values()) - min(weights_after_3.values()) > 1e-3  # the schedule has moved off uniform

    # a new process resumes the same output_dir from checkpoint-3: steps 4..8 are redone
    resumed, resumed_schedule = run(tok, tmp_path, resume=str(ckpt))
    records = read_jsonl(log)
    assert [r["step"] for r in records] == list(range(1, 9)), "every step once, in order"
    for got, want in zip(records, reference):
        assert_records_equal(got, want)  # 1..3 kept as written, 4..8 replayed identically

    # the sampler continued the same stream with the same weights, the schedule the same state
    assert resumed.mixture_sampler.weights_history == full.mixture_sampler.weights_history
    assert resumed.mixture_sampler.state_dict() == full.mixture_sampler.state_dict()
    assert json.dumps(resumed_schedule.state_dict()) == json.dumps(full_schedule.state_dict())
    for step in range(4, 9):
        assert resumed.prompts_by_step[step] == full.prompts_by_step[step], f"step {step}"


@pytest.mark.slow
def test_resume_without_schedule_continues_the_log(tok, tmp_path):
    """TRL's own RepeatSampler (no schedule): the log is continued, the replay still exact."""

    def plain(resume=None):
        trainer = make_trainer(
            Recording, tok, tmp_path, max_steps=5, save_strategy="steps", save_steps=2, optim="adamw_torch",
            balanced=BalancedConfig(method="pcgrad"),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = plain()
    log = tmp_path / "out" / "metrics.jsonl"
    reference = read_jsonl(log)
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / BALANCED_STATE_NAME).read_text())
    assert saved["sampler"] is None and saved["global_step"] == 2
    resumed = plain(resume=str(tmp_path / "out" / "checkpoint-4"))
    records = read_jsonl(log)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for got, want in zip(records, reference):
        assert_records_equal(got, want)
    assert resumed.prompts_by_step[5] == full.prompts_by_step[5]


@pytest.mark.slow
def test_resume_without_balanced_state_warns(tok, tmp_path, caplog):
    full, _ = run(tok, tmp_path)
    ckpt = tmp_path / "out" / "checkpoint-6"
    os.remove(ckpt / BALANCED_STATE_NAME)
    with caplog.at_level("WARNING", logger="balancedmix.integrations.trl"):
        run(tok, tmp_path, resume=str(ckpt))
    assert any(BALANCED_STATE_NAME in r.getMessage() and "mixture" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == list(range(1, 9))


# --------------------------------------------------------------------------- the log truncation
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_truncate_after_step_keeps_the_prefix(tmp_path):
    path = tmp_path / "m.jsonl"
    write_lines(path, [json.dumps({"step": s, "x": s}) for s in (1, 2, 3, 4, 5)])
    assert truncate_after_step(path, 3) == 2
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert truncate_after_step(path, 3) == 0
    assert truncate_after_step(tmp_path / "missing.jsonl", 3) == 0


def test_truncate_after_step_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "x"')
    assert truncate_after_step(path, 2) == 1
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_truncate_after_step_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    text = json.dumps({"step": 1}) + "\nnot json\n" + json.dumps({"step": 2}) + "\n"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        truncate_after_step(path, 5)
    assert path.read_text() == text  # nothing lost


class OpaqueState:
    """A user schedule (duck-typed) whose state is not JSON."""

    def __init__(self):
        self.calls = 0

    def weights(self, step):
        return {"add": 1.0, "copy": 1.0, "rev": 1.0}

    def update(self, metrics):
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls, "blob": object()}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_unserialisable_schedule_state_does_not_stop_training(tok, tmp_path, caplog):
    trainer = make_trainer(
        BalancedGRPOTrainer, tok, tmp_path, max_steps=2, save_strategy="steps", save_steps=1,
        balanced=BalancedConfig(schedule=OpaqueState()),
    )
    with caplog.at_level("ERROR", logger="balancedmix.integrations.trl"):
        trainer.train()
    assert trainer.state.global_step == 2
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / BALANCED_STATE_NAME).read_text())
    assert saved["sampler"] is None and "not JSON serialisable" in saved["sampler_error"]
    assert any("cannot save the mixture state" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("make", [schedules.GradientShare, schedules.LearningProgress, schedules.WorstTask])
def test_sampler_and_schedule_state_survive_the_json_checkpoint(make):
    """The checkpoint file is JSON: every adaptive schedule's state and the sampler's round-trip exactly."""
    import itertools

    from balancedmix.sampler import MixtureSampler

    rows = [{"task": t} for t in "aabbbcccc"]
    metrics = [
        {"update_share/a": 0.5 - 0.03 * i, "update_share/b": 0.3, "update_share/c": 0.2 + 0.03 * i,
         "reward/a/mean": 0.1 * i, "reward/b/mean": 0.5, "reward/c/mean": float("nan") if i == 2 else 0.2 + 0.01 * i * i}
        for i in range(8)
    ]

    def drive(sampler, it, start, stop):
        out = []
        for i in range(start, stop):
            out.append(list(itertools.islice(it, 6)))
            sampler.schedule.update(metrics[i])
        return out

    kw = dict(prompts_per_batch=3, num_generations=2, repeat_count=1, seed=5, num_batches=10)
    full = MixtureSampler(rows, weights=make(), **kw)
    it = iter(full)
    head = drive(full, it, 0, 4)
    state = json.loads(json.dumps(full.state_dict()))
    tail = drive(full, it, 4, 8)
    resumed = MixtureSampler(rows, weights=make(), **kw)
    resumed.load_state_dict(state)
    assert drive(resumed, iter(resumed), 4, 8) == tail
    assert json.dumps(resumed.schedule.state_dict()) == json.dumps(full.schedule.state_dict())
    assert head != tail
    assert len(full.weights_history) > 1, "the schedule changed the weights"
