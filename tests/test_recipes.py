"""Recipes and CLI: BalancedGRPOConfig parsing/serialisation, ``balancedmix grpo``, tracker key levels, LoRA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from transformers import HfArgumentParser, TrainerCallback  # noqa: E402
from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, TrlParser  # noqa: E402
from trl.scripts.grpo import GRPOScriptArguments  # noqa: E402

from balancedmix import schedules  # noqa: E402
from balancedmix.integrations.config import BALANCED_FIELDS, SCHEDULES, BalancedGRPOConfig, build_schedule  # noqa: E402
from balancedmix.integrations.trl import REPORT_KEY_LEVELS, BalancedConfig, BalancedGRPOTrainer, report_key_level  # noqa: E402
from balancedmix.logger import read_jsonl  # noqa: E402
from balancedmix.recipes import load_reward_funcs, suite_reward, write_tiny_assets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--use_cpu", "true", "--bf16", "false"]

# one non-default value for every balanced_* field, as command-line strings and as parsed values
EVERY_FIELD_ARGS = [
    "--balanced_task_column", "kind",
    "--balanced_tasks", "a", "b", "c",
    "--balanced_method", "cagrad",
    "--balanced_method_options", '{"c": 0.25}',
    "--balanced_estimator", "split",
    "--balanced_schedule", "learning_progress",
    "--balanced_schedule_options", '{"fast": 0.3, "slow": 0.8, "floor": 0.1}',
    "--balanced_log_dir", "logs/x",
    "--balanced_write_jsonl", "false",
    "--balanced_order_by_task", "false",
    "--balanced_homogeneous", "false",
    "--balanced_nonfinite", "skip_task",
    "--balanced_mismatch_tol", "0.01",
    "--balanced_seed", "7",
    "--balanced_report_keys", "minimal",
    "--balanced_sketch_dim", "4096",
]  # fmt: skip
EVERY_FIELD_VALUES = {
    "balanced_task_column": "kind",
    "balanced_tasks": ["a", "b", "c"],
    "balanced_method": "cagrad",
    "balanced_method_options": {"c": 0.25},
    "balanced_estimator": "split",
    "balanced_schedule": "learning_progress",
    "balanced_schedule_options": {"fast": 0.3, "slow": 0.8, "floor": 0.1},
    "balanced_log_dir": "logs/x",
    "balanced_write_jsonl": False,
    "balanced_order_by_task": "false",
    "balanced_homogeneous": "false",
    "balanced_nonfinite": "skip_task",
    "balanced_mismatch_tol": 0.01,
    "balanced_seed": 7,
    "balanced_report_keys": "minimal",
    "balanced_sketch_dim": 4096,
}


def _check_every_field(args: BalancedGRPOConfig) -> None:
    assert args.balanced_dict() == EVERY_FIELD_VALUES
    cfg = args.to_balanced_config()
    assert (cfg.task_key, cfg.tasks, cfg.method, cfg.method_options) == ("kind", ["a", "b", "c"], "cagrad", {"c": 0.25})
    assert (cfg.estimator, cfg.log_dir, cfg.write_jsonl, cfg.order_by_task) == ("split", "logs/x", False, False)
    assert cfg.homogeneous is False
    assert (cfg.nonfinite, cfg.mismatch_tol, cfg.seed, cfg.report_keys) == ("skip_task", 0.01, 7, "minimal")
    assert cfg.sketch_dim == 4096
    assert isinstance(cfg.schedule, schedules.LearningProgress)
    assert (cfg.schedule.fast, cfg.schedule.slow, cfg.schedule.floor) == (0.3, 0.8, 0.1)


def test_every_balanced_field_is_covered():
    assert set(EVERY_FIELD_VALUES) == set(BALANCED_FIELDS)
    assert set(BALANCED_FIELDS.values()) == {f for f in BalancedConfig.__dataclass_fields__}


# ------------------------------------------------------------------------------------------ parsing
def test_hf_argument_parser_with_no_arguments(tmp_path):
    """HfArgumentParser(BalancedConfig) exited 2 on every call (task_key typed as a Callable)."""
    (args,) = HfArgumentParser(BalancedGRPOConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *CPU])
    assert args.to_balanced_config() == BalancedConfig()


def test_cli_args_parse_every_field(tmp_path):
    """--method, --tasks, --order_by_task failed to parse; now every balanced_* flag does."""
    parser = HfArgumentParser(BalancedGRPOConfig)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *CPU, *EVERY_FIELD_ARGS])
    _check_every_field(args)


def test_tasks_comma_separated(tmp_path):
    parser = HfArgumentParser(BalancedGRPOConfig)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *CPU, "--balanced_tasks", "a,b", "c"])
    assert args.balanced_tasks == ["a", "b", "c"]


def test_trl_parser_no_seed_clash(tmp_path):
    """TrlParser((GRPOConfig, ..., BalancedConfig)) clashed on --seed; the balancedmix seed is balanced_seed."""
    parser = TrlParser((GRPOScriptArguments, BalancedGRPOConfig, ModelConfig, DatasetMixtureConfig))
    _, args, _, _ = parser.parse_args_and_config(["--output_dir", str(tmp_path), *CPU, "--seed", "3"])
    assert args.seed == 3 and args.balanced_seed is None


def test_yaml_recipe_every_field_and_overrides(tmp_path):
    """YAML gives every field (schedule by name with options as a mapping); flags override the YAML."""
    recipe = tmp_path / "recipe.yaml"
    lines = [f"output_dir: {tmp_path / 'out'}", "use_cpu: true", "bf16: false", "model_name_or_path: m", "dataset_name: d"]
    for key, value in EVERY_FIELD_VALUES.items():
        if key == "balanced_order_by_task":
            value = False  # a YAML boolean
        lines.append(f"{key}: {json.dumps(value)}")
    recipe.write_text("\n".join(lines) + "\n")
    parser = TrlParser((GRPOScriptArguments, BalancedGRPOConfig, ModelConfig, DatasetMixtureConfig))
    script, args, model, _ = parser.parse_args_and_config(["--config", str(recipe)])
    assert (script.dataset_name, model.model_name_or_path) == ("d", "m")
    _check_every_field(args)
    _, args2, _, _ = parser.parse_args_and_config(["--config", str(recipe), "--balanced_method", "pcgrad", "--balanced_method_options", "{}"])
    assert args2.balanced_method == "pcgrad" and args2.to_balanced_config().method == "pcgrad"


@pytest.mark.parametrize(
    "name, options, cls",
    [
        ("fixed", {"weights": {"a": 2, "b": 1}}, schedules.Fixed),
        ("size", {}, schedules.SizeProportional),
        ("temperature", {"tau": 2.0}, schedules.Temperature),
        ("gradient_share", {"rate": 0.3}, schedules.GradientShare),
        ("learning_progress", {}, schedules.LearningProgress),
        ("worst_task", {"temperature": 0.5}, schedules.WorstTask),
    ],
)
def test_schedule_by_name(tmp_path, name, options, cls):
    assert set(SCHEDULES) == {"fixed", "size", "temperature", "gradient_share", "learning_progress", "worst_task"}
    args = BalancedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, balanced_schedule=name, balanced_schedule_options=options)
    assert isinstance(args.to_balanced_config().schedule, cls)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"balanced_method": "nope"}, "unknown method 'nope'"),
        ({"balanced_method": "cagrad", "balanced_method_options": {"zz": 1}}, "balanced_method 'cagrad'"),
        ({"balanced_schedule": "nope"}, "unknown balanced_schedule 'nope'"),
        ({"balanced_schedule": "temperature"}, "balanced_schedule 'temperature'.*tau"),
        ({"balanced_schedule": "temperature", "balanced_schedule_options": {"t": 1}}, r"does not take option\(s\) \['t'\]"),
        ({"balanced_schedule_options": {"tau": 1}}, "without a balanced_schedule"),
        ({"balanced_schedule": {"a": 1.0}}, "balanced_schedule: fixed"),
        ({"balanced_order_by_task": "maybe"}, "balanced_order_by_task"),
        ({"balanced_estimator": "exact"}, "estimator"),
        ({"balanced_report_keys": "some"}, "report_keys"),
        ({"balanced_method_options": "{not json"}, "JSON"),
    ],
)
def test_bad_values_raise_naming_the_field(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        BalancedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **fields)


def test_defaults_have_one_source():
    """The balanced_* defaults are read from BalancedConfig: changing one there changes the other."""
    args = BalancedGRPOConfig(output_dir="x", use_cpu=True, bf16=False)
    assert args.to_balanced_config() == BalancedConfig()
    field = BalancedGRPOConfig.__dataclass_fields__["balanced_mismatch_tol"]
    assert field.default == BalancedConfig.__dataclass_fields__["mismatch_tol"].default


def test_build_schedule_none():
    assert build_schedule(None) is None


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_dict_json_and_pickle(tmp_path):
    args = BalancedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **EVERY_FIELD_VALUES)
    d = args.to_dict()
    assert {k: d[k] for k in BALANCED_FIELDS} == EVERY_FIELD_VALUES
    again = BalancedGRPOConfig.from_dict(json.loads(args.to_json_string()))
    assert again.to_dict() == d
    _check_every_field(again)
    sanitized = args.to_sanitized_dict()  # tensorboard hparams: plain types only
    assert sanitized["balanced_method"] == "cagrad" and sanitized["balanced_report_keys"] == "minimal"
    torch.save(args, tmp_path / "training_args.bin")  # what Trainer.save_model writes
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert loaded.to_dict() == d


# ------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), n_train_per_task=8, n_eval_per_task=2, hidden_size=16)


def _trainer(assets, tmp_path, cls=BalancedGRPOTrainer, **kw):
    from datasets import load_from_disk

    args_kw = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        num_generations=4, max_completion_length=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_steps=2, logging_steps=1, learning_rate=0.01, seed=0, activation_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    args_kw.update({k: kw.pop(k) for k in list(kw) if k in BalancedGRPOConfig.__dataclass_fields__})
    return cls(
        model=assets["model"],
        reward_funcs=suite_reward,
        args=BalancedGRPOConfig(**args_kw),
        train_dataset=load_from_disk(assets["data"])["train"],
        **kw,
    )


class RunConfigRecorder(TrainerCallback):
    """What a tracker (wandb, trackio, tensorboard, mlflow) records at on_train_begin: args.to_dict()."""

    def __init__(self) -> None:
        self.config: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.config = args.to_dict()
        return control


def test_tracker_callback_sees_balanced_fields(assets, tmp_path):
    recorder = RunConfigRecorder()
    trainer = _trainer(assets, tmp_path, balanced_method="normalize", balanced_schedule="temperature", balanced_schedule_options={"tau": 2.0}, callbacks=[recorder])
    assert trainer.balanced.method == "normalize" and isinstance(trainer.balanced.schedule, schedules.Temperature)
    trainer.train()
    assert recorder.config is not None
    assert recorder.config["balanced_method"] == "normalize"
    assert recorder.config["balanced_schedule"] == "temperature"
    assert recorder.config["balanced_schedule_options"] == {"tau": 2.0}
    assert set(BALANCED_FIELDS) <= set(recorder.config)


def test_settings_given_twice_raise(assets, tmp_path):
    with pytest.raises(ValueError, match="holds the balancedmix settings"):
        _trainer(assets, tmp_path, balanced=BalancedConfig(method="pcgrad"))
    with pytest.raises(ValueError, match=r"\['method'\]"):
        _trainer(assets, tmp_path, method="pcgrad")


# ------------------------------------------------------------------------------------------ key levels
def test_report_key_level_table():
    table = {
        "reward/add/mean": "minimal",
        "update_share/add": "minimal",
        "mixture/weight/add": "minimal",
        "nonfinite/add": "minimal",
        "grad_norm/add": "standard",
        "coef/add": "standard",
        "num_samples/add": "standard",
        "grad_norm/update": "standard",
        "grad_scale": "standard",
        "grad_norm_unbiased/add": "standard",
        "noise_scale/add": "standard",
        "split_microbatches": "standard",
        "mixture/batches_drawn": "standard",
        "cos/add/sort": "all",
        "advantage/add/mean": "all",
        "advantage/add/abs_mean": "all",
        "completion_length/add/mean": "all",
        "num_microbatches/add": "all",
        "reward/add/std": "all",
        "buffer_bytes": "all",
        "grad_norm/total": "all",
        "grad_sqnorm_unbiased/add": "all",
        "noise_trace/add": "all",
        "mixture/task_epochs/add": "all",
    }
    assert {k: report_key_level(k) for k in table} == table


@pytest.mark.parametrize("level", REPORT_KEY_LEVELS)
def test_trimmed_tracker_keys_at_each_level(assets, tmp_path, level):
    """report_to/log_history get the level's keys only; metrics.jsonl keeps every key."""
    trainer = _trainer(assets, tmp_path, balanced_report_keys=level, balanced_method="normalize", balanced_estimator="split", balanced_schedule="size")
    trainer.train()
    jsonl_keys = set().union(*(r.keys() for r in read_jsonl(Path(trainer.metrics_path))))
    tracked = set().union(*(h.keys() for h in trainer.state.log_history if "step" in h))
    ours = {k for k in jsonl_keys if k not in ("step", "time", "loss", "step_time", "learning_rate", "microbatches", "optimizer_step", "global_step")}
    rank = REPORT_KEY_LEVELS.index(level)
    expected = {k for k in ours if REPORT_KEY_LEVELS.index(report_key_level(k)) <= rank}
    assert ours & tracked == expected
    assert any(k.startswith("cos/") for k in jsonl_keys)  # the file keeps everything at every level
    tasks = trainer.task_registry.names
    if level == "all":
        assert expected == ours
    elif level == "minimal":
        assert {f"update_share/{t}" for t in tasks} <= tracked and not any(k.startswith("grad_norm/") for k in tracked - {"grad_norm"})


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_buffer_size_is_tasks_times_trainable_params(assets, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(assets, tmp_path, peft_config=lora, max_steps=3)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    opt = trainer.balanced_optimizer
    assert opt.buffers.numel == trainable < total
    rows = len(opt.buffers.keys)
    assert rows == len(trainer.task_registry)  # every task seen in 3 steps of 4 prompts
    last = read_jsonl(Path(trainer.metrics_path))[-1]
    assert last["buffer_bytes"] == rows * trainable * 4  # float32


# ------------------------------------------------------------------------------------------ CLI
def test_load_reward_funcs_errors():
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        load_reward_funcs(["nope"])
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_funcs(["balancedmix.recipes.nope"])
    assert load_reward_funcs(["balancedmix.recipes.suite_reward"]) == [suite_reward]


def test_grpo_help_lists_balanced_fields(capsys):
    from balancedmix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["grpo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--balanced_method" in out and "--balanced_schedule_options" in out and "--lora_r" in out


def _recipe(tmp_path: Path, assets: dict, method: str) -> Path:
    """examples/recipes/<name>.yaml with the asset paths and a few steps."""
    name = "baseline" if method == "sum" else "corrected"
    text = (ROOT / "examples" / "recipes" / f"{name}.yaml").read_text()
    text = text.replace("examples/recipes/assets/model", assets["model"]).replace("examples/recipes/assets/data", assets["data"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_example_recipes_differ_only_in_method():
    base = (ROOT / "examples/recipes/baseline.yaml").read_text().splitlines()
    corr = (ROOT / "examples/recipes/corrected.yaml").read_text().splitlines()
    diff = [(a, b) for a, b in zip(base, corr) if a != b]
    assert len(base) == len(corr) and diff == [("balanced_method: sum", "balanced_method: normalize")]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_grpo_cli_end_to_end_and_report(assets, tmp_path):
    """`balancedmix grpo --config` on the local tiny model and dataset (no hub), both example recipes,
    then `balancedmix report` compares them."""
    runs = []
    for method in ("sum", "normalize"):
        out = tmp_path / ("baseline" if method == "sum" else "corrected")
        cmd = [sys.executable, "-m", "balancedmix.cli", "grpo", "--config", str(_recipe(tmp_path, assets, method)),
               "--output_dir", str(out), "--max_steps", "3", "--max_completion_length", "4"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3]
        meta = json.loads((out / "run.json").read_text())
        assert meta["method"] == method and meta["balanced"]["balanced_method"] == method
        saved = torch.load(out / "training_args.bin", weights_only=False)
        assert saved.balanced_method == method
        assert (out / "model.safetensors").is_file()
        runs.append(out)
    proc = subprocess.run([sys.executable, "-m", "balancedmix.cli", "report", *map(str, runs), "--out", str(tmp_path / "report")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "`baseline` (sum" in report and "`corrected` (normalize" in report


@pytest.mark.slow
@pytest.mark.distributed
def test_grpo_cli_two_processes(assets, tmp_path):
    """The same under `python -m torch.distributed.run --nproc_per_node 2` (gloo, CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "balancedmix.cli", "grpo", "--config", str(_recipe(tmp_path, assets, "normalize")),
           "--output_dir", str(out), "--max_steps", "2", "--max_completion_length", "4",
           "--per_device_train_batch_size", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    log = f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert (out / "metrics.jsonl").is_file(), log
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2], log
    tasks = json.loads((out / "run.json").read_text())["tasks"]
    # the global generation batch: 2 processes x 4 rows x 2 accumulation steps
    assert all(sum(r[f"num_samples/{t}"] for t in tasks) == 16 for r in records), log
    if proc.returncode != 0:  # torch/gloo can abort while tearing down after a complete run
        assert "SIGABRT" in proc.stderr or "Signal 6" in proc.stderr or "exitcode  : -6" in proc.stderr, log


def test_grpo_cli_bad_input_exits_2(tmp_path, capsys):
    """A missing recipe, an unknown YAML key, or a bad balanced_* value: exit status 2 and the reason."""
    from balancedmix.cli import main

    assert main(["grpo", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nbf16: false\nbalanced_methd: pcgrad\n")
    assert main(["grpo", "--config", str(recipe)]) == 2
    assert "balanced_methd" in capsys.readouterr().err
    recipe.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nbf16: false\nbalanced_method: nope\n")
    assert main(["grpo", "--config", str(recipe)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_load_train_dataset_from_disk(tmp_path, assets):
    """dataset_name may be a save_to_disk folder: a DatasetDict as is, a single Dataset as the train split."""
    from datasets import Dataset

    from balancedmix.recipes import load_train_dataset

    script = GRPOScriptArguments(dataset_name=assets["data"])
    mixture = DatasetMixtureConfig()
    assert set(load_train_dataset(script, mixture)) == {"train", "test"}
    Dataset.from_list([{"prompt": "1+1=", "task": "add", "answer": "2"}]).save_to_disk(str(tmp_path / "one"))
    script = GRPOScriptArguments(dataset_name=str(tmp_path / "one"), dataset_train_split="mine")
    assert load_train_dataset(script, mixture)["mine"]["task"] == ["add"]
    with pytest.raises(ValueError, match="no dataset"):
        load_train_dataset(GRPOScriptArguments(), mixture)
