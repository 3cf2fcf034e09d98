"""The demo: synthetic suite (data, rewards, warm start, eval), runner options, ``demo --quick`` end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix.demo import suite as S
from balancedmix.demo.toy import build_char_tokenizer, build_tiny_causal_lm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ reference answers
def reference_answer(prompt: str, task: str) -> str:
    """Each task's answer recomputed from the prompt text alone."""
    if task == "add":
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b))
    if task == "reverse":
        assert prompt.startswith("rev ") and prompt.endswith(":")
        return prompt[4:-1][::-1]
    if task == "sort":
        assert prompt.startswith("sort ") and prompt.endswith(":")
        return "".join(sorted(prompt[5:-1]))
    if task == "parity":
        assert prompt.startswith("par ") and prompt.endswith("?")
        return "yes" if prompt[4:-1].count("1") % 2 == 0 else "no"
    raise AssertionError(task)


def test_splits_deterministic_disjoint_and_correct():
    train, evalset = S.build_splits(40, 10, seed=3)
    train2, evalset2 = S.build_splits(40, 10, seed=3)
    assert train.to_list() == train2.to_list() and evalset.to_list() == evalset2.to_list()
    assert train.column_names == ["prompt", "task", "answer"]
    assert len(train) == 160 and len(evalset) == 40
    for split in (train, evalset):
        counts = {t: 0 for t in S.TASKS}
        for row in split:
            counts[row["task"]] += 1
            assert row["answer"] == reference_answer(row["prompt"], row["task"])
        assert len(set(counts.values())) == 1
    assert not set(train["prompt"]) & set(evalset["prompt"])
    assert len(set(train["prompt"])) == len(train)
    other, _ = S.build_splits(40, 10, seed=4)
    assert other["prompt"] != train["prompt"]


def test_prompts_use_only_tokenizer_characters():
    tok = build_char_tokenizer()
    train, _ = S.build_splits(30, 5, seed=0)
    for row in train:
        ids = tok(row["prompt"] + row["answer"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(ids) == len(row["prompt"] + row["answer"])
    longest = max(len(r["answer"]) for r in train)
    assert longest <= S.max_answer_chars()


def test_suite_config_validation_and_subset():
    with pytest.raises(ValueError, match="subset"):
        S.SuiteConfig(tasks=("add", "poetry"))
    with pytest.raises(ValueError, match="reverse_len"):
        S.SuiteConfig(reverse_len=(5, 2))
    with pytest.raises(ValueError, match="add_digits"):
        S.SuiteConfig(add_digits=0)
    cfg = S.SuiteConfig(tasks=("sort", "parity"))
    train, _ = S.build_splits(5, 2, seed=0, config=cfg)
    assert set(train["task"]) == {"sort", "parity"}
    assert [f.__name__ for f in S.reward_functions(cfg)] == ["reward_sort", "reward_parity"]


def test_too_many_distinct_prompts_is_a_clear_error():
    with pytest.raises(ValueError, match="task 'parity': could not draw 100 distinct prompts"):
        S.build_rows(100, seed=0, config=S.SuiteConfig(parity_len=(2, 3)))
    with pytest.raises(ValueError, match="unknown demo task 'poetry'"):
        S.make_example("poetry", random.Random(0))


# ------------------------------------------------------------------------------------ rewards
def reference_positional(pred: str, answer: str) -> float:
    n = max(len(pred), len(answer))
    if n == 0:
        return 1.0
    return sum(1 for i in range(min(len(pred), len(answer))) if pred[i] == answer[i]) / n


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="abcj", max_size=8), st.text(alphabet="abcj", min_size=1, max_size=8))
def test_reverse_partial_credit_matches_reference(pred, answer):
    r = S.score("reverse", pred, answer)
    assert r == pytest.approx(reference_positional(pred, answer))
    assert 0.0 <= r <= 1.0
    assert (r == 1.0) == (pred == answer)


def test_reward_functions_trl_signature_and_none_for_other_tasks():
    fns = {f.__name__: f for f in S.reward_functions()}
    assert set(fns) == {f"reward_{t}" for t in S.TASKS}
    prompts = ["3+4=", "rev abc:", "sort 312:", "par 11?", "par 1?"]
    completions = ["7", " cba ", "123x", "yes", "yes"]
    tasks = ["add", "reverse", "sort", "parity", "parity"]
    answers = ["7", "cba", "123", "yes", "no"]
    kw = {"completion_ids": None, "trainer_state": None}
    assert fns["reward_add"](prompts, completions, task=tasks, answer=answers, **kw) == [1.0, None, None, None, None]
    assert fns["reward_reverse"](prompts, completions, task=tasks, answer=answers, **kw) == [None, 1.0, None, None, None]
    assert fns["reward_sort"](prompts, completions, task=tasks, answer=answers, **kw) == [None, None, 0.0, None, None]
    assert fns["reward_parity"](prompts, completions, task=tasks, answer=answers, **kw) == [None, None, None, 1.0, 0.0]
    conversational = [[{"role": "assistant", "content": "7"}]]
    assert fns["reward_add"](["3+4="], conversational, task=["add"], answer=["7"]) == [1.0]
    with pytest.raises(ValueError, match="reward_add: completions, task and answer must have the same length"):
        fns["reward_add"](prompts, completions, task=tasks[:2], answer=answers)
    assert S.is_correct("reverse", "cba", "cba") and not S.is_correct("reverse", "cb", "cba")


# ------------------------------------------------------------------------- warm start and eval
def test_sft_warm_start_learns_and_is_deterministic():
    tok = build_char_tokenizer()
    train, _ = S.build_splits(32, 4, seed=0)
    rows = [train[i] for i in range(len(train))]
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
        losses.append(S.sft_warm_start(model, tok, rows, steps=40, batch_size=16, lr=3e-3, seed=0))
    assert losses[0] == losses[1]
    assert sum(losses[0][:5]) / 5 - sum(losses[0][-5:]) / 5 > 0.8  # nats; ~1.1 measured
    with pytest.raises(ValueError, match="steps must be >= 1"):
        S.sft_warm_start(model, tok, rows, steps=0)


def test_sft_labels_only_on_answer_and_eos():
    tok = build_char_tokenizer()
    enc = S._tokenize_sft(tok, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "rev ab:", "answer": "ba"}])
    batch = S._collate_sft(enc, tok.pad_token_id, torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 10)  # "rev ab:" + "ba" + eos
    labels = batch["labels"].tolist()
    assert labels[0] == [-100] * 4 + tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + [-100] * 4
    assert labels[1][:7] == [-100] * 7 and labels[1][7:] == tok("ba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert batch["attention_mask"].sum(1).tolist() == [6, 10]


def test_evaluate_scores_exact_match_per_task(monkeypatch):
    rows = [
        {"prompt": "1+2=", "task": "add", "answer": "3"},
        {"prompt": "2+2=", "task": "add", "answer": "4"},
        {"prompt": "rev ab:", "task": "reverse", "answer": "ba"},
        {"prompt": "par 11?", "task": "parity", "answer": "yes"},
    ]
    outputs = {"1+2=": "3", "2+2=": "5", "rev ab:": "bb", "par 11?": "yes"}
    monkeypatch.setattr(S, "generate", lambda model, tok, prompts, max_new_tokens, batch_size=128: [outputs[p] for p in prompts])
    res = S.evaluate(None, None, rows)
    assert res["eval/accuracy/add"] == 0.5 and res["eval/reward/add"] == 0.5
    assert res["eval/accuracy/reverse"] == 0.0 and res["eval/reward/reverse"] == 0.5
    assert res["eval/accuracy/parity"] == 1.0
    assert res["eval/accuracy/mean"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError, match="empty"):
        S.evaluate(None, None, [])


def test_generate_cuts_at_eos_and_is_greedy():
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    a = S.generate(model, tok, ["1+2=", "rev abc:"], max_new_tokens=5)
    b = S.generate(model, tok, ["1+2=", "rev abc:"], max_new_tokens=5, batch_size=1)
    assert a == b and all(len(x) <= 5 for x in a)
    assert all("<" not in x for x in a)


# ----------------------------------------------------------------------------------- runner
def test_parse_schedule_specs():
    schedules = pytest.importorskip("balancedmix.schedules")
    from balancedmix.demo.run import parse_schedule

    assert isinstance(parse_schedule("gradient_share"), schedules.GradientShare)
    assert isinstance(parse_schedule("worst-task"), schedules.WorstTask)
    assert isinstance(parse_schedule("learning_progress"), schedules.LearningProgress)
    assert isinstance(parse_schedule("temperature:2"), schedules.Temperature)
    fixed = parse_schedule("fixed:add=1,reverse=3")
    assert isinstance(fixed, schedules.Fixed)
    for bad, msg in [("nope", "unknown schedule 'nope'"), ("temperature:x", "needs a number"), ("fixed:add", "not TASK=WEIGHT"), ("fixed:", "needs weights")]:
        with pytest.raises(ValueError, match=msg):
            parse_schedule(bad)


def test_demo_config_validation_and_presets():
    from balancedmix.demo.run import PRESETS, DemoConfig

    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        DemoConfig(prompts_per_step=3, num_generations=3, micro_batch_size=4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        DemoConfig(num_generations=1)
    for name, cfg in PRESETS.items():
        rows_per_task = cfg.prompts_per_step * cfg.num_generations // len(cfg.tasks)
        assert rows_per_task >= 2 * cfg.micro_batch_size, name  # split-half estimate at every step
        assert cfg.prompts_per_step % len(cfg.tasks) == 0, name  # stratified: equal prompts per task


def test_run_demo_rejects_bad_arguments_before_training(tmp_path):
    from balancedmix.demo.run import run_demo

    with pytest.raises(ValueError, match="unknown method"):
        run_demo(tmp_path, methods=["sum", "nope"], progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        run_demo(tmp_path, preset="huge", progress=False)
    with pytest.raises(ValueError, match="unknown schedule"):
        run_demo(tmp_path, methods=["sum"], schedule="nope", progress=False)
    with pytest.raises(ValueError, match="listed twice"):
        run_demo(tmp_path, methods=["sum", "sum"], progress=False)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ end to end
SECTIONS = [
    "## Findings",
    "## Runs compared",
    "## Per-task gradients",
    "## Gradient norm over steps",
    "## Update share",
    "## Task-gradient cosines",
    "## Learning gain vs gradient norm",
    "## Correlation with training statistics",
]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    from balancedmix.analysis import load_run
    from balancedmix.cli import main
    from balancedmix.demo.run import PRESETS

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    steps = PRESETS["quick"].grpo_steps
    for run in ("sum", "normalize", "pcgrad"):
        run_dir = out / run
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        for r in records:
            for task in S.TASKS:
                for key in (f"grad_norm/{task}", f"update_share/{task}", f"num_samples/{task}", f"reward/{task}/mean"):
                    assert key in r, (run, r["step"], key)
                assert r[f"num_samples/{task}"] > 0
        assert sum(f"grad_sqnorm_unbiased/{t}" in r for r in records for t in S.TASKS) == steps * len(S.TASKS)
        evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
        assert [e["phase"] for e in evals] == ["before", "after"]
        assert all(0.0 <= evals[-1][f"eval/accuracy/{t}"] <= 1.0 for t in S.TASKS)
        meta = json.loads((run_dir / "run.json").read_text())
        assert meta["method"] == run and meta["steps"] == steps
        assert load_run(run_dir).tasks == S.TASKS
    # same warm start: every run's "before" evaluation is identical
    befores = {json.loads((out / r / "eval.jsonl").read_text().splitlines()[0])["eval/accuracy/mean"] for r in ("sum", "normalize", "pcgrad")}
    assert len(befores) == 1
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    pngs = list(out.glob("*.png"))
    assert {p.stem for p in pngs} >= {"grad_norms", "norm_ratio", "update_share", "cosine", "learning_gain", "accuracy"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
        assert f"({p.name})" in report
    # the report CLI reproduces the report from the run folders
    again = tmp_path / "again"
    assert main(["report", str(out / "sum"), str(out / "pcgrad"), "--out", str(again)]) == 0
    assert "`pcgrad` vs `sum`" in (again / "report.md").read_text()


@pytest.mark.slow
def test_demo_schedule_end_to_end(tmp_path):
    """``demo --schedule``: the extra ``sum+<spec>`` run exists, logs the mixture weights of every
    task at every step, an adaptive schedule moves them, and the report compares the run."""
    from balancedmix.cli import main
    from balancedmix.demo.run import PRESETS

    out = tmp_path / "demo"
    steps = 3
    argv = ["demo", "--quick", "--methods", "sum", "--schedule", "gradient_share", "--steps", str(steps)]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    cfg = PRESETS["quick"]
    rows_per_step = cfg.prompts_per_step * cfg.num_generations

    def weights(run: str) -> list[dict[str, float]]:
        records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, steps + 1)), run
        per_step = []
        for r in records:
            w = {}
            for task in S.TASKS:
                assert f"mixture/weight/{task}" in r, (run, r["step"], task)
                assert f"num_samples/{task}" in r, (run, r["step"], task)
                w[task] = r[f"mixture/weight/{task}"]
                assert w[task] >= 0.0
            assert sum(w.values()) == pytest.approx(1.0, abs=1e-9), (run, r["step"])
            assert sum(r[f"num_samples/{t}"] for t in S.TASKS) == rows_per_step, (run, r["step"])
            per_step.append(w)
        return per_step

    sched_run = "sum+gradient_share"
    assert (out / sched_run).is_dir()
    # the baseline keeps the stratified equal mixture; the adaptive schedule moves its weights
    assert all(w == pytest.approx({t: 1 / len(S.TASKS) for t in S.TASKS}) for w in weights("sum"))
    moving = weights(sched_run)
    assert moving[0] == pytest.approx({t: 1 / len(S.TASKS) for t in S.TASKS})  # no update before the first step
    assert any(moving[i] != pytest.approx(moving[0]) for i in range(1, steps)), moving
    meta = json.loads((out / sched_run / "run.json").read_text())
    assert meta["method"] == "sum" and meta["schedule"] == "gradient_share" and meta["steps"] == steps
    # both runs start from the same warm start
    befores = {(out / r / "eval.jsonl").read_text().splitlines()[0] for r in ("sum", sched_run)}
    assert len(befores) == 1
    report = (out / "report.md").read_text()
    table = report.split("## Runs compared", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")]
    assert rows == ["sum", sched_run], table
    assert f"`{sched_run}` vs `sum`" in report
