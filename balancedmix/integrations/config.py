"""``BalancedGRPOConfig``: TRL's ``GRPOConfig`` plus the balancedmix settings as plain, parseable fields.

For recipes and the command line (``HfArgumentParser`` / ``TrlParser``, YAML files, ``balancedmix
grpo --config recipe.yaml``) and so that the balancedmix settings travel with ``args``: they are in
``args.to_dict()`` / ``to_json_string()``, hence in the run config that wandb, trackio, tensorboard
and mlflow record, and a baseline and a corrected run differ visibly on a dashboard::

    from balancedmix.integrations.config import BalancedGRPOConfig
    from balancedmix.integrations.trl import BalancedGRPOTrainer

    args = BalancedGRPOConfig(output_dir="runs/a", balanced_method="normalize",
                              balanced_schedule="temperature", balanced_schedule_options={"tau": 2.0})
    trainer = BalancedGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

Every balancedmix field is ``balanced_<name>`` (no clash with TRL/transformers fields such as
``seed``); its default is read from :class:`~balancedmix.integrations.trl.BalancedConfig`, the one
source of defaults. ``to_balanced_config()`` returns the equivalent ``BalancedConfig`` (the trainer
calls it). Python users who need a callable task key, a callable method or a schedule object keep
using a plain ``GRPOConfig`` with ``balanced=BalancedConfig(...)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from trl import GRPOConfig

from .. import schedules as _schedules
from .trl import REPORT_KEY_LEVELS, BalancedConfig

__all__ = ["BalancedGRPOConfig", "SCHEDULES", "build_schedule", "BALANCED_FIELDS"]

SCHEDULES: dict[str, Callable[..., Any]] = {
    "fixed": _schedules.Fixed,
    "size": _schedules.SizeProportional,
    "temperature": _schedules.Temperature,
    "gradient_share": _schedules.GradientShare,
    "learning_progress": _schedules.LearningProgress,
    "worst_task": _schedules.WorstTask,
}
"""Mixture schedules by name (``balanced_schedule``); options are the class's keyword arguments."""


def build_schedule(name: str | None, options: Mapping[str, Any] | None = None) -> Any:
    """The mixture schedule named ``name`` (a :data:`SCHEDULES` key) built with ``options``; ``None`` → ``None``.

    Raises ``ValueError`` naming the schedule and its accepted options for an unknown name or a
    bad option.
    """
    options = dict(options or {})
    if name is None:
        if options:
            raise ValueError(f"balanced_schedule_options {options} given without a balanced_schedule")
        return None
    key = str(name).strip().lower().replace("-", "_")
    factory = SCHEDULES.get(key)
    if factory is None:
        raise ValueError(f"unknown balanced_schedule {name!r}; available: {', '.join(SCHEDULES)}")
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"balanced_schedule {key!r} does not take option(s) {unknown}; it accepts {accepted}")
    try:
        return factory(**options)
    except TypeError as err:  # a missing required option (fixed: weights, temperature: tau)
        raise ValueError(f"balanced_schedule {key!r}: {err}; it accepts {accepted}") from None


_BC = {f.name: f for f in dataclasses.fields(BalancedConfig)}


def _default(name: str) -> Any:
    return _BC[name].default


BALANCED_FIELDS: dict[str, str] = {
    "balanced_task_column": "task_key",
    "balanced_tasks": "tasks",
    "balanced_method": "method",
    "balanced_method_options": "method_options",
    "balanced_estimator": "estimator",
    "balanced_schedule": "schedule",
    "balanced_schedule_options": "schedule",
    "balanced_log_dir": "log_dir",
    "balanced_write_jsonl": "write_jsonl",
    "balanced_order_by_task": "order_by_task",
    "balanced_homogeneous": "homogeneous",
    "balanced_nonfinite": "nonfinite",
    "balanced_mismatch_tol": "mismatch_tol",
    "balanced_seed": "seed",
    "balanced_report_keys": "report_keys",
    "balanced_sketch_dim": "sketch_dim",
}
"""``BalancedGRPOConfig`` field → the :class:`BalancedConfig` field it sets."""


def _order_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


@dataclasses.dataclass
class BalancedGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the balancedmix settings (``balanced_*`` fields, defaults from ``BalancedConfig``).

    Fields (see ``docs/recipes.md`` and :class:`~balancedmix.integrations.trl.BalancedConfig`):

    - ``balanced_task_column``: dataset column naming each row's task.
    - ``balanced_tasks``: task names in index order (``None``: the column's sorted values).
    - ``balanced_method`` / ``balanced_method_options``: registered method name and its options
      (a mapping, or a JSON object string on the command line).
    - ``balanced_estimator``: ``raw`` or ``split``.
    - ``balanced_schedule`` / ``balanced_schedule_options``: a mixture schedule by name
      (:data:`SCHEDULES`) and its keyword options; ``None`` keeps TRL's sampler.
    - ``balanced_log_dir``, ``balanced_write_jsonl``: the ``metrics.jsonl`` location and switch.
    - ``balanced_order_by_task``: ``auto``, ``true`` or ``false``.
    - ``balanced_homogeneous``: ``auto``, ``true`` or ``false`` (single-task micro-batches by construction).
    - ``balanced_nonfinite``, ``balanced_mismatch_tol``, ``balanced_seed``: ``BalancedOptimizer`` options.
    - ``balanced_report_keys``: ``minimal``, ``standard`` or ``all`` keys to the ``report_to`` trackers.
    - ``balanced_sketch_dim``: ``None`` (exact task buffers) or ``d`` (sketch mode, lagged corrections).
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["balanced_method_options", "balanced_schedule_options"]

    balanced_task_column: str = dataclasses.field(
        default=_default("task_key"), metadata={"help": "Dataset column naming each row's task."}
    )
    balanced_tasks: list[str] | None = dataclasses.field(
        default=_default("tasks"),
        metadata={"help": "Task names, in the order used for indices and logs. Default: the sorted values of the task column."},
    )
    balanced_method: str = dataclasses.field(
        default=_default("method"),
        metadata={"help": "balancedmix gradient method: sum (plain GRPO), mean, normalize, pcgrad, mgda, cagrad, imtl_g, upgrad, weights."},
    )
    balanced_method_options: dict[str, Any] | str | None = dataclasses.field(
        default_factory=_BC["method_options"].default_factory,
        metadata={"help": "Options of the method (a JSON object on the command line, a mapping in YAML), e.g. '{\"c\": 0.4}'."},
    )
    balanced_estimator: str = dataclasses.field(
        default=_default("estimator"),
        metadata={"help": "raw, or split (split-half unbiased per-task norms and noise scales; 2x buffer memory)."},
    )
    balanced_schedule: str | None = dataclasses.field(
        default=_default("schedule"),
        metadata={"help": "Task-mixture schedule by name: " + ", ".join(SCHEDULES) + ". Default: none (TRL's sampler)."},
    )
    balanced_schedule_options: dict[str, Any] | str | None = dataclasses.field(
        default_factory=dict,
        metadata={"help": "Keyword options of the schedule, e.g. '{\"tau\": 2.0}' for temperature, '{\"weights\": {\"add\": 2, \"copy\": 1}}' for fixed."},
    )
    balanced_log_dir: str | None = dataclasses.field(
        default=_default("log_dir"), metadata={"help": "Folder of metrics.jsonl. Default: output_dir."}
    )
    balanced_write_jsonl: bool = dataclasses.field(
        default=_default("write_jsonl"), metadata={"help": "Write <log_dir>/metrics.jsonl (main process only)."}
    )
    balanced_order_by_task: str = dataclasses.field(
        default=_order_text(_default("order_by_task")),
        metadata={"help": "auto: re-order each step's rows by task where exact; false: keep TRL's order; true: require re-ordering."},
    )
    balanced_homogeneous: str = dataclasses.field(
        default=_order_text(_default("homogeneous")),
        metadata={"help": "auto: single-task micro-batches by construction where the batch geometry allows (else split, logged once); false: TRL's sampler; true: require it."},
    )
    balanced_nonfinite: str = dataclasses.field(
        default=_default("nonfinite"), metadata={"help": "NaN/Inf task gradients: error, skip_task or skip_step."}
    )
    balanced_mismatch_tol: float = dataclasses.field(
        default=_default("mismatch_tol"), metadata={"help": "Tolerance of the uniform-rescale check on p.grad."}
    )
    balanced_seed: int | None = dataclasses.field(
        default=_default("seed"), metadata={"help": "Seed of the method's generator (PCGrad order). Default: seed."}
    )
    balanced_report_keys: str = dataclasses.field(
        default=_default("report_keys"),
        metadata={"help": "Per-step balancedmix keys sent to report_to trackers: " + ", ".join(REPORT_KEY_LEVELS) + " (metrics.jsonl keeps all)."},
    )
    balanced_sketch_dim: int | None = dataclasses.field(
        default=_default("sketch_dim"),
        metadata={"help": "None: exact per-task buffers (K x P); d: sketch mode, K x d values and lagged corrections (docs/diagnostics.md)."},
    )

    def __post_init__(self) -> None:
        # JSON strings of the dict fields (the command line) are parsed here, with an error naming
        # the field, before GRPOConfig.__post_init__ would try them itself
        for name in ("balanced_method_options", "balanced_schedule_options"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif isinstance(value, str):
                try:
                    value = json.loads(value) if value.strip() else {}
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name} must be a JSON object, got {value!r} ({err})") from None
                setattr(self, name, value)
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must be a mapping (a JSON object on the command line), got {getattr(self, name)!r}")
            setattr(self, name, dict(getattr(self, name)))
        super().__post_init__()
        if isinstance(self.balanced_schedule, Mapping):
            raise ValueError(
                "balanced_schedule names a schedule; for fixed weights use balanced_schedule: fixed and "
                f"balanced_schedule_options: {{weights: {dict(self.balanced_schedule)}}}"
            )
        if isinstance(self.balanced_schedule, str) and self.balanced_schedule.strip().lower() in ("", "none"):
            self.balanced_schedule = None
        if self.balanced_tasks is not None:  # a list, "a,b", or ["a,b", "c"] from the command line
            items = [self.balanced_tasks] if isinstance(self.balanced_tasks, str) else list(self.balanced_tasks)
            self.balanced_tasks = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
        self.balanced_order_by_task = _order_text(self.balanced_order_by_task)
        if self.balanced_order_by_task not in ("auto", "true", "false"):
            raise ValueError(f"balanced_order_by_task must be auto, true or false, got {self.balanced_order_by_task!r}")
        self.balanced_homogeneous = _order_text(self.balanced_homogeneous)
        if self.balanced_homogeneous not in ("auto", "true", "false"):
            raise ValueError(f"balanced_homogeneous must be auto, true or false, got {self.balanced_homogeneous!r}")
        from ..methods import make_method

        try:  # an unknown name or a bad option fails here, not at the first optimizer step
            make_method(self.balanced_method, **self.balanced_method_options)
        except TypeError as err:
            raise ValueError(f"balanced_method {self.balanced_method!r} with options {self.balanced_method_options}: {err}") from None
        self.to_balanced_config()  # validates the rest (estimator, schedule options, report level...)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BalancedGRPOConfig:
        """Rebuild a config from ``to_dict()`` / ``json.loads(to_json_string())`` (e.g. a tracker's run config).

        ``GRPOConfig.__post_init__`` derives ``generation_batch_size`` from ``steps_per_generation``
        and mirrors ``activation_checkpointing*`` into the deprecated ``gradient_checkpointing*``;
        both forms appear in ``to_dict()`` and cannot be passed back together, so the derived ones
        are dropped (same process count assumed). ``to_sanitized_dict``'s extra
        ``train_batch_size``/``eval_batch_size`` are dropped too.
        """
        d = dict(config)
        if d.get("steps_per_generation") is not None:
            d.pop("generation_batch_size", None)
        for old, new in (("gradient_checkpointing", "activation_checkpointing"), ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if new in d:
                d.pop(old, None)
        d.pop("train_batch_size", None)
        d.pop("eval_batch_size", None)
        return cls(**d)

    def to_balanced_config(self) -> BalancedConfig:
        """The :class:`BalancedConfig` these fields describe (a fresh schedule object on every call)."""
        order = {"auto": "auto", "true": True, "false": False}[_order_text(self.balanced_order_by_task)]
        homogeneous = {"auto": "auto", "true": True, "false": False}[_order_text(self.balanced_homogeneous)]
        return BalancedConfig(
            task_key=self.balanced_task_column,
            tasks=self.balanced_tasks,
            method=self.balanced_method,
            method_options=dict(self.balanced_method_options or {}),
            estimator=self.balanced_estimator,
            schedule=build_schedule(self.balanced_schedule, self.balanced_schedule_options),
            log_dir=self.balanced_log_dir,
            write_jsonl=self.balanced_write_jsonl,
            order_by_task=order,
            homogeneous=homogeneous,
            nonfinite=self.balanced_nonfinite,
            mismatch_tol=self.balanced_mismatch_tol,
            seed=self.balanced_seed,
            report_keys=self.balanced_report_keys,
            sketch_dim=self.balanced_sketch_dim,
        )

    def balanced_dict(self) -> dict[str, Any]:
        """The ``balanced_*`` fields and their values (what a run's tracker config holds for balancedmix)."""
        return {name: getattr(self, name) for name in BALANCED_FIELDS}
