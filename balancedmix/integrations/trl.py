"""TRL ``GRPOTrainer`` integration: per-task gradients, corrections and task mixtures in a GRPO run.

Change the import and add one config object::

    from balancedmix.integrations.trl import BalancedConfig, BalancedGRPOTrainer

    trainer = BalancedGRPOTrainer(
        model=model, reward_funcs=rewards, args=GRPOConfig(...), train_dataset=ds,   # plain TRL
        balanced=BalancedConfig(task_key="task", method="normalize", log_dir="runs/a"),
    )
    trainer.train()

What the integration does (see ``docs/trl.md`` for the details and the exactness argument):

* **Optimizer** — whatever optimizer the Trainer builds (``args.optim``, ``optimizers=``,
  ``optimizer_cls_and_kwargs=``) is wrapped in :class:`~balancedmix.optimizer.BalancedOptimizer`
  in ``create_optimizer``, before ``accelerator.prepare``.
* **Task labels** — ``_generate_and_score_completions`` adds a ``task_ids`` tensor (one task
  index per completion, long ``[rows]``) and a ``task_rewards`` tensor (the completion's weighted
  reward, float ``[rows]``, NaN when unscorable) to the generation batch; both survive TRL's
  shuffle and split because every per-row tensor is permuted and sliced together.
* **Single-task backwards** — after TRL's shuffle, the rows of every optimizer step's window of
  micro-batches are stably re-ordered by task (when the ``loss_type`` and config make the
  micro-batch grouping irrelevant to the gradient), so most micro-batches hold one task; their
  backward is attributed with ``opt.task(name)``. With ``homogeneous="auto"`` (the default) the
  training sampler's per-task quotas come in whole micro-batches (units of
  ``lcm(per_device_train_batch_size, num_generations)`` rows, the same on every process), so
  where the batch geometry allows, *every* micro-batch holds one task, the same at each
  micro-step on every rank; where it does not, a warning says once why and how to fix it. A micro-batch that still mixes tasks is split:
  TRL's own ``_compute_loss`` runs on the whole micro-batch, but its policy forward is done per
  task sub-batch (rows of one task); the gradient of the loss with respect to each sub-batch's
  per-token log-probabilities (and entropies) is taken through the loss head only, and each
  sub-batch is back-propagated once with that seed under its task. The per-task gradients
  therefore sum to the unsplit micro-batch's gradient for every ``loss_type`` and option
  (KL, entropy bonus, top-entropy quantile, off-policy mask...), and no backward ever runs
  over the whole micro-batch more than once.
* **Metrics** — per optimizer step: every ``BalancedOptimizer.diagnostics()`` key, per-task
  reward/advantage/completion-length statistics and sample counts go into
  ``trainer._metrics["train"]`` (hence ``trainer.state.log_history`` and every ``report_to``
  backend) and, with ``loss``, ``step_time`` and ``learning_rate``, into one JSONL line at
  ``<log_dir>/metrics.jsonl``.
* **Mixture** — with ``BalancedConfig.schedule`` the training sampler is a
  :class:`~balancedmix.sampler.MixtureSampler` (same index structure as TRL's ``RepeatSampler``)
  and :class:`ScheduleCallback` feeds the schedule the step's metrics.
* **Checkpoints** — each Trainer checkpoint also holds :data:`BALANCED_STATE_NAME` (the
  sampler's and schedule's state); ``train(resume_from_checkpoint=...)`` restores it and continues
  ``metrics.jsonl`` after the checkpoint's step (lines past it are dropped and redone), so a
  resumed run replays an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from ..logger import JSONLLogger, truncate_after_step
from ..optimizer import BalancedOptimizer
from ..sampler import class_label_names
from ..tasks import MissingTaskLabelError, TaskError, TaskKey, TaskRegistry, UnknownTaskError, task_labels

__all__ = [
    "BalancedConfig",
    "BalancedGRPOMixin",
    "BalancedGRPOTrainer",
    "ScheduleCallback",
    "TASK_IDS_KEY",
    "GROUP_IDS_KEY",
    "TASK_REWARDS_KEY",
    "REORDER_SAFE_LOSS_TYPES",
    "METRICS_FILENAME",
    "REPORT_KEY_LEVELS",
    "report_key_level",
    "BALANCED_STATE_NAME",
]

logger = logging.getLogger(__name__)

TASK_IDS_KEY = "task_ids"
"""Key of the per-row task index tensor (long ``[rows]``) added to TRL's generation batch."""
TASK_REWARDS_KEY = "task_rewards"
GROUP_IDS_KEY = "group_ids"
"""Per-row long tensor: the row's GRPO group (its prompt's position in the global generation batch)."""
"""Key of the per-row weighted reward tensor (float ``[rows]``, NaN = unscorable)."""
METRICS_FILENAME = "metrics.jsonl"
BALANCED_STATE_NAME = "balancedmix_state.json"
"""File of each Trainer checkpoint holding the ``MixtureSampler`` state (read position, weight
history and the schedule's state), so that ``train(resume_from_checkpoint=...)`` replays the mixture."""
_BALANCED_STATE_VERSION = 1

REORDER_SAFE_LOSS_TYPES = frozenset({"grpo", "sapo", "luspo", "dr_grpo", "dapo", "cispo", "vespo"})
"""Loss types whose gradient does not depend on how an optimizer step's rows are grouped into
micro-batches of equal size (``bnpo`` normalises by the micro-batch's own token count)."""

_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
    "num_tiles",
)

REPORT_KEY_LEVELS = ("minimal", "standard", "all")
"""Tracker verbosity levels of ``BalancedConfig.report_keys`` (each level includes the previous)."""

# keys reported from "minimal" up: the per-task figures a baseline/corrected comparison needs
_MINIMAL_KEY = re.compile(r"^(reward/.+/mean|update_share/.+|mixture/weight/.+|nonfinite/.+)$")
# keys reported only at "all": O(K^2) cosines, distribution details, and run-level duplicates
# (grad_norm/total is the Trainer's own grad_norm); metrics.jsonl keeps them at every level
_ALL_ONLY_KEY = re.compile(
    r"^(cos/.+|advantage/.+|completion_length/.+|num_microbatches/.+|reward/.+/std|buffer_bytes|grad_norm/total"
    r"|grad_sqnorm_unbiased/.+|noise_trace/.+|mixture/task_epochs/.+)$"
)


@functools.lru_cache(maxsize=4096)  # called for every key at every step: the regexes run once per key
def report_key_level(key: str) -> str:
    """The lowest ``report_keys`` level at which a per-step metric ``key`` reaches the trackers.

    ``"minimal"``: ``reward/<task>/mean``, ``update_share/<task>``, ``mixture/weight/<task>``,
    ``nonfinite/<task>``. ``"all"`` only: ``cos/<a>/<b>``, ``advantage/...``,
    ``completion_length/...``, ``num_microbatches/<task>``, ``reward/<task>/std``,
    ``buffer_bytes``, ``grad_norm/total`` (= the Trainer's ``grad_norm``),
    ``grad_sqnorm_unbiased/<task>``, ``noise_trace/<task>``, ``mixture/task_epochs/<task>``.
    Everything else (``grad_norm/<task>``, ``coef/<task>``, ``num_samples/<task>``,
    ``grad_norm/update``, ``grad_scale``, ``grad_norm_unbiased/<task>``, ``noise_scale/<task>``,
    ``split_microbatches``, and keys this table does not name) is ``"standard"``.
    """
    if _MINIMAL_KEY.match(key):
        return "minimal"
    if _ALL_ONLY_KEY.match(key):
        return "all"
    return "standard"


# per-task accumulator columns (float64 [K, 7])
_N, _NR, _RSUM, _RSQ, _ASUM, _AABS, _LSUM = range(7)


@dataclasses.dataclass
class BalancedConfig:
    """Configuration of the balancedmix part of a :class:`BalancedGRPOTrainer`.

    Attributes:
        task_key: dataset column naming each row's task (default ``"task"``; ``str`` names or an
            HF ``ClassLabel`` column, decoded with its own ``names``), or a callable
            ``rows -> labels`` receiving a list of row dicts (TRL's batch; with ``schedule`` the
            sampler calls it with a list of one row).
        tasks: the task names, in the order used for indices and logs. ``None``: the sorted
            distinct values of the ``task_key`` column of ``train_dataset`` (a ``ClassLabel``
            column: its classes present, in its order). Required for a streaming
            (``IterableDataset``) train dataset, which is never read to find tasks, and for a
            callable ``task_key``.
        method: a registered balancedmix method (``"sum"``, ``"mean"``, ``"normalize"``,
            ``"pcgrad"``...) or a callable method; ``"sum"`` leaves the update untouched.
        method_options: keyword options of the method's factory.
        estimator: ``"raw"`` or ``"split"`` (split-half unbiased norms and noise scales; 2x buffers).
        sketch_dim: ``None`` (exact task buffers) or ``d``: sketch mode, ``K × d`` values instead of
            ``K × P``, sketched figures with standard errors, corrections applied one step late (see
            ``BalancedOptimizer``). Under DDP (micro-steps under ``no_sync``) ``p.grad`` is
            all-reduced with the sketches before the clip, by ``synchronize()``.
        schedule: a mixture schedule (``weights(step)`` / ``update(metrics)``) or a
            ``{task: weight}`` dict; ``None`` keeps TRL's ``RepeatSampler`` (dataset proportions).
            Needs a map-style train dataset (a streaming one raises ``ValueError``).
        log_dir: folder of the per-run ``metrics.jsonl``; ``None`` uses ``args.output_dir``.
        write_jsonl: write the JSONL file (main process only).
        order_by_task: ``"auto"`` re-orders each optimizer step's rows by task when that leaves
            the gradient unchanged (see :data:`REORDER_SAFE_LOSS_TYPES`); ``False`` keeps TRL's
            order (every mixed micro-batch is split); ``True`` requires re-ordering and raises
            when the config makes it unsafe.
        homogeneous: ``"auto"`` (default) makes every micro-batch single-task by construction
            where the batch geometry allows: the training sampler is a
            :class:`~balancedmix.sampler.MixtureSampler` (size-proportional weights without a
            ``schedule``) whose per-task quotas are whole units of ``lcm(per_device_train_batch_size,
            num_generations)`` rows on every process, and the re-order by task then fills each
            micro-batch with one task — the same task at each micro-step on every rank. Where the
            geometry or config does not allow it, micro-batches that mix tasks are split (exact),
            and the reason and its fix are logged once. ``False`` keeps TRL's sampler (no
            ``schedule``) or prompt-level quotas; ``True`` raises when it is not possible.
        nonfinite: ``BalancedOptimizer`` policy for NaN/Inf task gradients.
        mismatch_tol: ``BalancedOptimizer`` tolerance on the uniform-rescale check of ``p.grad``.
        seed: seed of the method's generator (PCGrad order); ``None`` uses ``args.seed``.
        report_keys: which per-step keys go to ``trainer._metrics`` (so ``log_history`` and every
            ``report_to`` tracker): ``"minimal"``, ``"standard"`` or ``"all"`` (see
            :func:`report_key_level`); ``metrics.jsonl`` always keeps every key.
    """

    task_key: TaskKey = "task"
    tasks: Sequence[str] | None = None
    method: Any = "sum"
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    estimator: str = "raw"
    sketch_dim: int | None = None
    schedule: Any = None
    log_dir: str | None = None
    write_jsonl: bool = True
    order_by_task: bool | str = "auto"
    homogeneous: bool | str = "auto"
    nonfinite: str = "error"
    mismatch_tol: float = 1e-3
    seed: int | None = None
    report_keys: str = "all"

    def __post_init__(self) -> None:
        if self.report_keys not in REPORT_KEY_LEVELS:
            raise ValueError(f"BalancedConfig.report_keys must be one of {list(REPORT_KEY_LEVELS)}, got {self.report_keys!r}")
        if self.estimator not in ("raw", "split"):
            raise ValueError(f"BalancedConfig.estimator must be 'raw' or 'split', got {self.estimator!r}")
        if self.sketch_dim is not None and (
            isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, int) or self.sketch_dim < 1
        ):
            raise ValueError(f"BalancedConfig.sketch_dim must be None or a positive integer, got {self.sketch_dim!r}")
        if self.order_by_task not in ("auto", True, False):
            raise ValueError(f"BalancedConfig.order_by_task must be 'auto', True or False, got {self.order_by_task!r}")
        if self.homogeneous not in ("auto", True, False):
            raise ValueError(f"BalancedConfig.homogeneous must be 'auto', True or False, got {self.homogeneous!r}")
        if not (isinstance(self.task_key, str) or callable(self.task_key)):
            raise TypeError(f"BalancedConfig.task_key must be a column name or a callable, got {self.task_key!r}")
        if self.tasks is not None:
            self.tasks = list(TaskRegistry(self.tasks).names)  # a str, a set or a reserved name: a clear error now
        self.method_options = dict(self.method_options)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(BalancedConfig))


def _json_default(value: Any) -> Any:
    """numpy / torch values in a schedule's state become plain Python values."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _tail_records(path: str) -> list[dict[str, Any]]:
    """The last record of a JSONL file (empty list for a missing or empty file)."""
    if not os.path.isfile(path):
        return []
    last = None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                last = line
    if last is None:
        return []
    try:
        record = json.loads(last)
    except json.JSONDecodeError:
        return []
    return [record] if isinstance(record, dict) else []


def _is_streaming(dataset: Any) -> bool:
    """An iterable (streaming) dataset: torch ``IterableDataset`` or HF ``datasets.IterableDataset``."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with trl
        return False
    return isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict))


class _RowKey:
    """Adapts a ``rows -> labels`` task key (``BalancedConfig.task_key``) to the sampler's ``row -> label``."""

    def __init__(self, key: Callable[[Any], Any]) -> None:
        self.key = key

    def __call__(self, row: Any) -> Any:
        labels = self.key([row])
        if isinstance(labels, (str, int)) or not isinstance(labels, (Sequence, torch.Tensor)):
            return labels
        if len(labels) != 1:
            raise TaskError(f"task_key returned {len(labels)} labels for a list of one row; it must return one label per row")
        return labels[0]


def _is_row_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1


def _take_rows(batch: Mapping[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Rows ``index`` of a TRL tensor dict (per-row tensors and lists; 0-d tensors/None kept)."""
    out: dict[str, Any] = {}
    idx_list = index.tolist()
    for key, value in batch.items():
        if _is_row_tensor(value):
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in idx_list]
        else:
            out[key] = value
    return out


def _cat_rows(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate TRL tensor dicts row-wise (0-d tensors and None are taken from the first)."""
    out: dict[str, Any] = {}
    for key, value in batches[0].items():
        if _is_row_tensor(value):
            out[key] = torch.cat([b[key] for b in batches], dim=0)
        elif isinstance(value, list):
            out[key] = [x for b in batches for x in b[key]]
        else:
            out[key] = value
    return out


def _split_rows(batch: Mapping[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    rows = len(batch[TASK_IDS_KEY])
    size = rows // num_chunks
    return [_take_rows(batch, torch.arange(i * size, (i + 1) * size)) for i in range(num_chunks)]


class ScheduleCallback(TrainerCallback):
    """Feeds an adaptive mixture schedule the metrics of every optimizer step.

    ``metrics_fn`` returns the last step's metrics dict (the JSONL line: diagnostics plus
    per-task reward means...); ``schedule.update(metrics)`` is called at ``on_step_end``.
    Schedules without ``update`` are left alone.
    """

    def __init__(self, schedule: Any, metrics_fn: Callable[[], Mapping[str, float] | None]) -> None:
        self.schedule = schedule
        self.metrics_fn = metrics_fn

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        update = getattr(self.schedule, "update", None)
        metrics = self.metrics_fn()
        if callable(update) and metrics:
            update(dict(metrics))
        return control


class _CloseLogCallback(TrainerCallback):
    def __init__(self, trainer: BalancedGRPOMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer._bm_after_step()
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer._bm_close_log()
        return control


class BalancedGRPOMixin:
    """Adds balancedmix to a ``GRPOTrainer`` (sub)class: ``class T(BalancedGRPOMixin, MyGRPOTrainer)``.

    Extra constructor keywords: ``balanced`` (a :class:`BalancedConfig`), any
    :class:`BalancedConfig` field as a keyword (overrides ``balanced``), and
    ``optimizer_cls_and_kwargs`` (forwarded to the HF Trainer, which GRPOTrainer does not do).

    Public attributes after construction: ``balanced`` (the config), ``task_registry``
    (task name ↔ index), ``balanced_optimizer`` (the :class:`BalancedOptimizer`, once
    ``train()`` has built it), ``mixture_sampler`` (the :class:`~balancedmix.sampler.MixtureSampler`
    when a schedule is set, once the dataloader is built), ``last_balanced_metrics`` (the last
    step's JSONL record), ``metrics_path``.
    """

    def __init__(self, *args: Any, balanced: BalancedConfig | None = None, optimizer_cls_and_kwargs: Any = None, **kwargs: Any) -> None:
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
        train_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        from_args = getattr(train_args, "to_balanced_config", None)
        if callable(from_args):  # a BalancedGRPOConfig: the balancedmix settings are part of args
            if balanced is not None or overrides:
                given = ["balanced"] if balanced is not None else sorted(overrides)
                raise ValueError(
                    f"args is a {type(train_args).__name__}, which holds the balancedmix settings, and {given} were "
                    "also given; set them once: in args (balanced_* fields) or with a plain GRPOConfig and balanced=..."
                )
            balanced = from_args()
        config = balanced if balanced is not None else BalancedConfig()
        if not isinstance(config, BalancedConfig):
            raise TypeError(f"balanced must be a BalancedConfig, got {type(config).__name__}")
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.balanced = config
        self.balanced_optimizer: BalancedOptimizer | None = None
        self.mixture_sampler: Any = None
        self.last_balanced_metrics: dict[str, float] | None = None
        self._bm_stack: contextlib.ExitStack | None = None
        self._bm_segments: list[tuple[str, int, int]] | None = None
        self._bm_segment_outputs: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self._bm_rewards_per_func: torch.Tensor | None = None
        self._bm_jsonl: JSONLLogger | None = None
        self._bm_resume_step: int | None = None
        self._bm_class_names: list[str] | None = None
        self._bm_label_registry: TaskRegistry | None = None
        self._bm_reset_step()
        super().__init__(*args, **kwargs)
        if optimizer_cls_and_kwargs is not None:
            if self.optimizer is not None:
                raise RuntimeError("Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible.")
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        if getattr(self.args, "remove_unused_columns", False) and isinstance(config.task_key, str):
            raise ValueError(
                f"remove_unused_columns=True drops the task column {config.task_key!r} before generation; "
                "set GRPOConfig(remove_unused_columns=False) (the GRPO default)"
            )
        self.task_registry = TaskRegistry(self._bm_discover_tasks())
        self._bm_stats = torch.zeros(len(self.task_registry), 7, dtype=torch.float64)
        self._bm_reorder_reason = self._bm_check_reorder()
        if config.order_by_task is True and self._bm_reorder_reason is not None:
            raise ValueError(f"order_by_task=True, but re-ordering micro-batches by task would change the gradient: {self._bm_reorder_reason}")
        self._bm_quota_unit, self._bm_homogeneous_reason = self._bm_plan_homogeneous()
        self._bm_report_homogeneous()
        self.add_callback(_CloseLogCallback(self))
        if config.schedule is not None:
            self.add_callback(ScheduleCallback(config.schedule, lambda: self.last_balanced_metrics))

    # ------------------------------------------------------------------ set-up
    def _bm_discover_tasks(self) -> list[str]:
        """The task names, in index order; sets ``_bm_label_registry`` (how integer labels decode).

        A streaming (iterable) ``train_dataset`` is never read here: its tasks must be declared.
        A map-style dataset's task column is read once (one column read) to check the labels.
        An HF ``ClassLabel`` column is decoded with the feature's own names.
        """
        cfg = self.balanced
        dataset = getattr(self, "train_dataset", None)
        key = cfg.task_key
        class_names = class_label_names(dataset, key) if isinstance(key, str) else None
        streaming = _is_streaming(dataset)
        if streaming and cfg.schedule is not None:
            raise ValueError(
                "BalancedConfig(schedule=...) needs a map-style train_dataset: the MixtureSampler picks each "
                "generation batch's prompts by index, and TRL reads a streaming (IterableDataset) train_dataset "
                "in stream order without a sampler, so the schedule would be ignored. Load the dataset map-style "
                "(datasets.load_dataset(..., streaming=False), or Dataset.from_generator), or interleave per-task "
                "streams yourself (datasets.interleave_datasets(probabilities=...)) and drop schedule="
            )
        if streaming:
            if cfg.tasks is None:
                raise TaskError(
                    "the train_dataset is a streaming (iterable) dataset, which is not read to find its tasks (it may "
                    "be large or endless); declare them with BalancedConfig(tasks=[...])"
                )
            self._bm_set_label_registry(class_names, cfg.tasks)
            return list(cfg.tasks)
        columns = getattr(dataset, "column_names", None)
        if isinstance(key, str) and isinstance(columns, (list, tuple)) and key not in columns:
            raise MissingTaskLabelError(
                f"train_dataset has no task column {key!r} (its columns are {list(columns)}); add a column naming "
                "each row's task or set BalancedConfig(task_key=...)"
            )
        seen: list[str] | None = None
        if isinstance(key, str) and isinstance(columns, (list, tuple)):
            values = list(dataset[key])
            if class_names is not None:
                bad_ids = sorted({v for v in values if not isinstance(v, int) or not 0 <= v < len(class_names)}, key=repr)
                if bad_ids:
                    raise TaskError(f"ClassLabel task column {key!r} holds {bad_ids[:5]}, not class indices of {class_names}")
                present = set(values)
                seen = [name for i, name in enumerate(class_names) if i in present]  # the ClassLabel's order
            else:
                bad = [v for v in set(values) if not isinstance(v, str)]
                if bad:
                    raise TaskError(
                        f"task column {key!r} holds non-string labels {sorted(map(repr, bad))[:5]}; tasks are named by "
                        "strings (or use a datasets.ClassLabel column)"
                    )
                seen = sorted(set(values))
        if cfg.tasks is not None:
            declared = list(cfg.tasks)
            if seen is not None:
                unknown = [t for t in seen if t not in declared]
                if unknown:
                    raise UnknownTaskError(
                        f"train_dataset holds task(s) {unknown} that are not declared in BalancedConfig.tasks={declared}"
                    )
            self._bm_set_label_registry(class_names, declared)
            return declared
        if seen is None:
            raise TaskError(
                "cannot list the tasks of this train_dataset (callable task_key, or a dataset without column_names); "
                "declare them with BalancedConfig(tasks=[...])"
            )
        if not seen:
            raise TaskError("train_dataset is empty: no task to train")
        self._bm_set_label_registry(class_names, seen)
        return seen

    def _bm_set_label_registry(self, class_names: list[str] | None, tasks: Sequence[str]) -> None:
        """Integer labels of a ``ClassLabel`` column are class indices, not task indices."""
        self._bm_class_names = class_names
        self._bm_label_registry = TaskRegistry(class_names) if class_names is not None else None
        if class_names is not None:
            missing = [t for t in tasks if t not in class_names]
            if missing:
                raise UnknownTaskError(f"declared task(s) {missing} are not classes of the ClassLabel task column {class_names}")

    def _bm_row_labels(self, rows: Any) -> list[str]:
        """One task name per row of TRL's list of row dicts."""
        registry = self._bm_label_registry if self._bm_label_registry is not None else self.task_registry
        return task_labels(rows, self.balanced.task_key, registry)

    def _bm_check_reorder(self) -> str | None:
        """Why re-ordering rows by task inside an optimizer step would change the gradient (None: it would not)."""
        if self.balanced.order_by_task is False:
            return "disabled by BalancedConfig(order_by_task=False)"
        if self.loss_type not in REORDER_SAFE_LOSS_TYPES:
            return f"loss_type={self.loss_type!r} normalises by each micro-batch's own token count"
        if getattr(self, "_entropy_bonus_enabled", False):
            return "the entropy bonus is a per-micro-batch token mean"
        if getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            return "top_entropy_quantile < 1 takes a quantile over each micro-batch"
        if getattr(self, "aux_loss_enabled", False):
            return "the MoE router aux loss is a per-micro-batch quantity"
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        if spg % ga != 0 and ga % spg != 0:
            return f"steps_per_generation={spg} and gradient_accumulation_steps={ga} do not divide one another"
        return None

    def _bm_plan_homogeneous(self) -> tuple[int | None, str | None]:
        """``(quota unit in prompts, None)`` when every micro-batch can be single-task by construction,
        else ``(None, why not and the fix)``. ``(None, None)``: nothing to do (one task, or disabled)."""
        cfg = self.balanced
        if cfg.homogeneous is False or len(self.task_registry) < 2:
            return None, None
        args = self.args
        b, g = args.per_device_train_batch_size, self.num_generations
        spg, ga, procs = args.steps_per_generation, args.gradient_accumulation_steps, self.accelerator.num_processes
        unit_rows = math.lcm(b, g)  # per process: whole micro-batches and whole GRPO groups
        local_rows = b * spg
        if self._bm_reorder_reason is not None:
            return None, f"rows cannot be re-ordered by task ({self._bm_reorder_reason})"
        if _is_streaming(getattr(self, "train_dataset", None)):
            return None, "a streaming train_dataset is read in order, without a sampler; load it map-style"
        if not getattr(self, "shuffle_dataset", True):
            return None, "shuffle_dataset=False keeps the dataset order; leave it True"
        if spg > ga:
            return None, (
                f"steps_per_generation={spg} > gradient_accumulation_steps={ga}: TRL's shuffle deals each optimizer "
                "step a random subset of the generation batch; set steps_per_generation equal to "
                "gradient_accumulation_steps (the default)"
            )
        if local_rows % unit_rows:
            return None, (
                f"a process's generation batch ({b} x {spg} = {local_rows} rows) is not a whole number of "
                f"lcm(per_device_train_batch_size={b}, num_generations={g}) = {unit_rows} rows; set "
                "per_device_train_batch_size to a multiple of num_generations (and of the rows per step)"
            )
        units = local_rows // unit_rows
        prompts = local_rows * procs // g
        if units < 2 and prompts > 1:
            return None, (
                f"a process's generation batch ({local_rows} rows) is a single unit of lcm(per_device_train_batch_size, "
                f"num_generations) = {unit_rows} rows, so single-task micro-batches would make every optimizer step "
                "single-task; raise gradient_accumulation_steps (with steps_per_generation) to 2 or more"
            )
        return procs * unit_rows // g, None

    def _bm_report_homogeneous(self) -> None:
        """Say once how micro-batches are made single-task, or why they cannot be (with the fix)."""
        unit, reason = self._bm_quota_unit, self._bm_homogeneous_reason
        if reason is not None:
            if self.balanced.homogeneous is True:
                raise ValueError(f"homogeneous=True, but micro-batches cannot all be single-task: {reason}")
            logger.warning(
                "balancedmix: micro-batches that mix tasks are split into per-task forwards (exact, but slower): %s", reason
            )
        elif unit is not None:
            args = self.args
            local_units = args.per_device_train_batch_size * args.steps_per_generation // math.lcm(
                args.per_device_train_batch_size, self.num_generations
            )
            per_step = local_units * max(1, args.gradient_accumulation_steps // args.steps_per_generation)
            logger.info(
                "balancedmix: single-task micro-batches by construction: per-task quotas in units of %d prompts "
                "(%d units per generation batch, so an optimizer step holds at most %d tasks)",
                unit, local_units, per_step,
            )

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """Build the Trainer's optimizer as usual, then wrap it in a :class:`BalancedOptimizer`."""
        super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt = self.optimizer
        if isinstance(opt, BalancedOptimizer):
            if tuple(opt.registry.names) != self.task_registry.names:
                raise TaskError(
                    f"the BalancedOptimizer passed in declares tasks {list(opt.registry.names)}, the trainer's tasks are "
                    f"{list(self.task_registry.names)}"
                )
            bopt = opt
            bopt.on_step = self._bm_on_optimizer_step
        else:
            cfg = self.balanced
            bopt = BalancedOptimizer(
                opt,
                task_key=cfg.task_key,
                method=cfg.method,
                tasks=list(self.task_registry.names),
                estimator=cfg.estimator,
                sketch_dim=cfg.sketch_dim,
                seed=self.args.seed if cfg.seed is None else cfg.seed,
                nonfinite=cfg.nonfinite,
                mismatch_tol=cfg.mismatch_tol,
                sync="buffers",  # DDP: every micro-step runs under no_sync (training_step); ignored otherwise
                on_step=self._bm_on_optimizer_step,
                **cfg.method_options,
            )
        scaler = getattr(self.accelerator, "scaler", None)  # fp16: the task buffers hold loss-scaled gradients
        if scaler is not None and bopt.grad_scaler is None:
            bopt.set_grad_scaler(scaler)
        self.optimizer = bopt
        self.balanced_optimizer = bopt
        return bopt

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        schedule = self.balanced.schedule
        unit = self._bm_quota_unit
        if schedule is None and unit is None:
            return super()._get_train_sampler(dataset)
        from ..sampler import MixtureSampler

        if dataset is None:
            dataset = self.train_dataset
        key = self.balanced.task_key
        if callable(key):
            # BalancedConfig.task_key receives a list of rows (TRL's batch); the sampler reads one row at a time
            key = _RowKey(key)
        self.mixture_sampler = MixtureSampler(
            dataset,
            task_key=key,
            weights=schedule,
            prompts_per_batch=self.args.generation_batch_size // self.num_generations,
            num_generations=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            seed=self.args.seed,
            tasks=list(self.task_registry.names),
            quota_unit=unit or 1,
            shards=self.accelerator.num_processes if unit else 1,
        )
        return self.mixture_sampler

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # before the Trainer's files: trainer_state.json, written last, marks a complete checkpoint
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self._bm_save_state(folder)
        super()._save_checkpoint(model, trial)

    def _bm_state(self) -> dict[str, Any]:
        sampler = self.mixture_sampler
        return {
            "version": _BALANCED_STATE_VERSION,
            "global_step": int(self.state.global_step),
            "tasks": list(self.task_registry.names),
            "sampler": sampler.state_dict() if sampler is not None else None,
        }

    def _bm_save_state(self, folder: str) -> None:
        """Write :data:`BALANCED_STATE_NAME` into a checkpoint folder (atomically)."""
        path = os.path.join(folder, BALANCED_STATE_NAME)
        state = self._bm_state()
        try:
            text = json.dumps(state, default=_json_default)
        except (TypeError, ValueError) as err:
            # a user schedule whose state_dict() is not JSON: keep training, say what the resume will lack
            logger.error(
                "cannot save the mixture state into %s (%s): a resume from this checkpoint will restart the mixture; "
                "make the schedule's state_dict() return plain Python values",
                path, err,
            )
            text = json.dumps(dict(state, sampler=None, sampler_error=str(err)))
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)

    def _bm_load_state(self, checkpoint: str) -> None:
        """Restore the mixture sampler (and its schedule) saved in ``checkpoint``."""
        path = os.path.join(checkpoint, BALANCED_STATE_NAME)
        sampler = self.mixture_sampler
        if not os.path.isfile(path):
            if sampler is not None:
                logger.warning(
                    "resuming from %s, which has no %s (saved by another trainer or an older balancedmix): the task "
                    "mixture restarts from the schedule's current state instead of replaying the interrupted run",
                    checkpoint, BALANCED_STATE_NAME,
                )
            return
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        if state.get("version") != _BALANCED_STATE_VERSION:
            raise TaskError(f"{path}: unknown balancedmix state version {state.get('version')!r}")
        if list(state["tasks"]) != list(self.task_registry.names):
            raise TaskError(
                f"{path} was saved with tasks {state['tasks']}, this trainer's tasks are {list(self.task_registry.names)}"
            )
        if sampler is None:
            if state.get("sampler") is not None:
                logger.warning("%s holds a mixture sampler state, but this run has no schedule: ignored", path)
            return
        if state.get("sampler") is None:
            reason = state.get("sampler_error") or "saved without a schedule"
            logger.warning("%s holds no mixture sampler state (%s): the mixture starts afresh", path, reason)
            return
        # the Trainer then calls set_epoch(epoch) and re-reads the epoch up to the checkpoint: the
        # batches drawn before the save keep their recorded weights (see MixtureSampler.load_state_dict)
        sampler.load_state_dict(state["sampler"])

    def _prepare_for_training(self, max_steps: Any, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        out = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self._bm_close_log()
        self._bm_resume_step = None
        if resume_from_checkpoint is not None:
            self._bm_load_state(resume_from_checkpoint)
            self._bm_resume_step = int(self.state.global_step)  # TrainerState of the checkpoint, loaded by now
        return out

    # ------------------------------------------------------------------ labels and rewards
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._bm_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        names = self._bm_row_labels(inputs)
        ids = [self.task_registry.index(n) for n in names]
        self._bm_rewards_per_func = None
        out = super()._generate_and_score_completions(inputs)
        rows = len(out["advantages"])
        if rows != len(ids):
            raise TaskError(f"the generation batch has {rows} completions but {len(ids)} task labels")
        device = out["advantages"].device
        out[TASK_IDS_KEY] = torch.tensor(ids, dtype=torch.long, device=device)
        # The sampler yields each prompt num_generations times in a row, aligned in the global
        # stream; this process holds global rows [process_index * rows, (process_index + 1) * rows).
        first = self.accelerator.process_index * rows
        out[GROUP_IDS_KEY] = torch.div(
            torch.arange(first, first + rows, device=device), self.num_generations, rounding_mode="floor"
        )
        rpf = self._bm_rewards_per_func
        if rpf is not None:
            weights = self.reward_weights.to(rpf.device, rpf.dtype).unsqueeze(0)
            rewards = (rpf * weights).nansum(dim=1)
            rewards[torch.isnan(rpf).all(dim=1)] = float("nan")
            start = self.accelerator.process_index * rows
            out[TASK_REWARDS_KEY] = rewards[start : start + rows].to(device)
        else:
            out[TASK_REWARDS_KEY] = torch.full((rows,), float("nan"), device=device)
        self._bm_rewards_per_func = None
        return out

    # ------------------------------------------------------------------ ordering the generation batch
    def _prepare_inputs(self, generation_batch: Any) -> Any:
        before = getattr(self, "_buffered_inputs", None)
        inputs = super()._prepare_inputs(generation_batch)
        buffered = getattr(self, "_buffered_inputs", None)
        if (
            self.model.training
            and self._bm_reorder_reason is None
            and buffered is not None
            and buffered is not before
            and not any(b.get(k) is not None for b in buffered for k in _MULTIMODAL_KEYS)
        ):
            self._buffered_inputs = self._bm_order_by_task(buffered)
            inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]
        return inputs

    def _bm_order_by_task(self, micro_batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stable re-order of the rows of each optimizer step's window of micro-batches by task.

        TRL shuffles the generation batch so that, when one generation feeds several optimizer
        steps, each step trains on a random subset of it. The set of rows of each optimizer step
        is kept; only the grouping of those rows into the step's micro-batches changes (rows of a
        task in shuffled order, tasks in index order), which leaves the step's gradient unchanged
        for the loss types in :data:`REORDER_SAFE_LOSS_TYPES`.
        """
        spg, ga = len(micro_batches), self.args.gradient_accumulation_steps
        window = ga if spg % ga == 0 else spg
        out: list[dict[str, Any]] = []
        for start in range(0, spg, window):
            group = micro_batches[start : start + window]
            merged = _cat_rows(group)
            # by task, then by GRPO group: a group's completions stay contiguous, so with
            # per_device_train_batch_size a multiple of num_generations no group straddles two
            # micro-batches (the split-half estimator needs independent halves: a group's
            # advantages sum to zero, so a group cut across halves biases it low)
            groups = merged[GROUP_IDS_KEY].cpu()
            key = merged[TASK_IDS_KEY].cpu() * (int(groups.max()) + 1) + groups
            order = torch.argsort(key, stable=True)
            out.extend(_split_rows(_take_rows(merged, order), len(group)))
        return out

    # ------------------------------------------------------------------ loss and backward
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        self._bm_attach_deepspeed(model)
        t0 = time.perf_counter()
        opt = self.balanced_optimizer
        if opt is not None and self._bm_microbatches == 0:
            # first micro-step of an optimizer step: accelerate's prepare may have swapped the optimizer's
            # parameters for FSDP2 shards since create_optimizer; re-detect before choosing no_sync or not
            opt.refresh()
        with contextlib.ExitStack() as stack:
            if self._bm_is_fsdp2(model):
                # FSDP2: per-task gradients are read from p.grad after each task block, so the reduce-scatter
                # must run at every micro-step. The Trainer puts non-final micro-steps under
                # accelerator.no_sync (set_requires_gradient_sync(False)); switch it back on for this one.
                # Never no_sync under FSDP2: p.grad would stay empty and the deferred reduce-scatter would
                # hand every task's gradient to the last block.
                model.set_requires_gradient_sync(True)
            elif self._bm_ddp_buffers_sync():
                # DDP: no micro-step may let DDP all-reduce p.grad. A micro-batch split by task runs
                # several forwards before its backwards, and DDP reduces at the first backward after a
                # synced forward, whichever task it belongs to (ranks would diverge). balancedmix
                # all-reduces the task buffers instead and writes the global p.grad before the clip
                # (sync="buffers", see _clip_grad_norm).
                stack.enter_context(self.accelerator.no_sync(model))
            self._bm_stack = stack
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._bm_stack = None
        self._bm_step_time += time.perf_counter() - t0
        self._bm_step_loss = self._bm_step_loss + loss.detach().float().mean()  # a tensor: no device sync here
        self._bm_microbatches += 1
        return loss

    def _bm_is_fsdp2(self, model: Any = None) -> bool:
        """FSDP2 (``fully_shard``, accelerate ``fsdp_version=2``): by the optimizer's engine or the module type."""
        opt = getattr(self, "balanced_optimizer", None)
        if opt is not None and opt.distributed.kind == "fsdp2":
            return True
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - torch without distributed
            return False
        return isinstance(model, FSDPModule)

    def _bm_attach_deepspeed(self, model: Any) -> None:
        """DeepSpeed: bind the wrapper to the engine once, before the first backward (see distributed/deepspeed.py)."""
        opt = self.balanced_optimizer
        if opt is None or opt.distributed.kind != "deepspeed-pending" or not getattr(self, "is_deepspeed_enabled", False):
            return
        from ..distributed import UnsupportedDistributedError
        from ..distributed.deepspeed import attach

        engine = model if hasattr(model, "zero_optimization_stage") else self.model_wrapped
        if engine.zero_optimization_stage() == 0:
            raise UnsupportedDistributedError(
                "BalancedGRPOTrainer under DeepSpeed ZeRO-0 is not supported (untested); use ZeRO-1/2/3 or DDP"
            )
        attach(engine, opt)

    def _bm_ddp_buffers_sync(self) -> bool:
        """Several processes with DDP (not FSDP2): every micro-step runs under ``no_sync``."""
        opt = getattr(self, "balanced_optimizer", None)
        return opt is not None and opt.distributed.kind == "ddp"

    def _clip_grad_norm(self, model: Any) -> Any:
        # under DDP p.grad holds this rank's local sum until the buffers are all-reduced: make it the
        # global gradient first, so the clip (and the logged grad_norm) is the same on every rank
        if self._bm_ddp_buffers_sync():
            self.balanced_optimizer.synchronize()
        return super()._clip_grad_norm(model)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        stack = self._bm_stack
        if stack is None or not self.model.training or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if TASK_IDS_KEY not in inputs:
            raise MissingTaskLabelError(
                f"the training inputs carry no {TASK_IDS_KEY!r} tensor; a _generate_and_score_completions override "
                "must call super() (BalancedGRPOMixin adds the task labels there)"
            )
        task_ids = inputs[TASK_IDS_KEY]
        self._bm_accumulate(inputs)
        present = torch.unique(task_ids).tolist()
        opt = self._bm_opt()
        aligned = None
        if opt.distributed.kind == "fsdp2":
            # FSDP2 reduce-scatters every task block: every rank must run the same task blocks in the same
            # order at every micro-step. The union of the tasks present on any rank, in registry order, is
            # run on every rank (a task absent here gets a zero-weight one-row block).
            aligned = self._bm_tasks_on_any_rank(task_ids)
        elif opt.distributed.kind == "deepspeed":  # one task per micro-batch (ZeRO-2/3: the same on every rank)
            opt.distributed.check_microbatch(present, len(self.task_registry))
        if len(present) == 1 and (aligned is None or aligned == [int(present[0])]):
            stack.enter_context(opt.task(self.task_registry.name(int(present[0]))))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return self._bm_split_backward(model, inputs, opt, stack, aligned)

    def _bm_tasks_on_any_rank(self, task_ids: torch.Tensor) -> list[int]:
        """Task indices present in this micro-step on any rank, sorted: one all-reduce of ``K`` int64."""
        import torch.distributed as dist

        mask = torch.bincount(task_ids.detach().reshape(-1), minlength=len(self.task_registry)).clamp_(max=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mask)
        return [t for t, n in enumerate(mask.tolist()) if n > 0]

    def _bm_opt(self) -> BalancedOptimizer:
        if self.balanced_optimizer is None:
            raise RuntimeError("BalancedGRPOTrainer has no BalancedOptimizer yet: it is built by create_optimizer() in train()")
        return self.balanced_optimizer

    def _bm_split_backward(
        self, model: Any, inputs: dict[str, Any], opt: BalancedOptimizer, stack: contextlib.ExitStack, aligned: list[int] | None = None
    ) -> torch.Tensor:
        """Loss of a mixed micro-batch with one backward per task sub-batch (see the module doc).

        Returns a tensor whose value is the unsplit micro-batch loss and whose backward (run by
        the Trainer, under the last task's ``opt.task``) is the last task's share. ``aligned``
        (FSDP2): the tasks to run blocks for, on every rank alike; a task without rows here runs
        its forward on one row and back-propagates zero (FSDP2's collectives stay matched).
        """
        mm = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if mm:
            raise NotImplementedError(
                f"a micro-batch mixing tasks with multimodal inputs {mm} cannot be split by task; "
                "make micro-batches single-task (one task per generation batch with MixtureSampler)"
            )
        if getattr(self, "aux_loss_enabled", False):
            raise NotImplementedError(
                "a micro-batch mixing tasks cannot be split by task with the MoE router aux loss (a batch-level "
                "term); set router_aux_loss_coef=0 or make micro-batches single-task"
            )
        task_ids = inputs[TASK_IDS_KEY]
        order = torch.argsort(task_ids.cpu(), stable=True)
        if not torch.equal(order, torch.arange(len(order))):
            inputs = _take_rows(inputs, order)
            task_ids = inputs[TASK_IDS_KEY]
        counts = torch.bincount(task_ids.cpu(), minlength=len(self.task_registry)).tolist()
        segments, start = [], 0
        for t, n in enumerate(counts):
            if n:
                segments.append((self.task_registry.name(t), start, start + n))
                start += n
            elif aligned is not None and t in aligned:
                segments.append((self.task_registry.name(t), 0, 0))  # empty here: a zero-weight block
        self._bm_segments = segments
        self._bm_segment_outputs = []
        try:
            loss = super().compute_loss(model, inputs)
        finally:
            self._bm_segments = None
        outputs, self._bm_segment_outputs = self._bm_segment_outputs, []
        if len(outputs) != len(segments):
            raise RuntimeError("the policy forward of _compute_loss was not intercepted; cannot split the micro-batch by task")
        self._bm_split_count += 1
        leaves: list[torch.Tensor] = []
        for (_, a, b), (_, logps, ent) in zip(segments, outputs):
            if a == b:
                continue  # zero-weight block: not part of the loss
            leaves.append(logps)
            if ent is not None and ent.requires_grad:
                leaves.append(ent)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        seeds = dict(zip(map(id, leaves), grads))

        def surrogate(logps: torch.Tensor, ent: torch.Tensor | None) -> torch.Tensor:
            total = logps.new_zeros(())
            if id(logps) not in seeds:  # a zero-weight block: runs the backward (and its collectives), adds 0
                return (logps * 0.0).sum()
            for x in (logps, ent):
                g = seeds.get(id(x)) if x is not None else None
                if g is not None:
                    total = total + (x * g).sum()
            return total

        # DDP: keep DDP's reducer out of the partial backwards (sync="buffers" is on anyway); never under FSDP2,
        # where each task's block must be reduce-scattered on its own
        ddp = opt.distributed.kind == "ddp"
        for name, logps, ent in outputs[:-1]:
            part = surrogate(logps, ent)
            if part.requires_grad:
                with self.accelerator.no_sync(model) if ddp else contextlib.nullcontext(), opt.task(name):
                    self.accelerator.backward(part)
        name, logps, ent = outputs[-1]
        stack.enter_context(opt.task(name))
        last = surrogate(logps, ent)
        return loss.detach() + (last - last.detach())

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *args: Any, **kwargs: Any) -> Any:
        segments = self._bm_segments
        if segments is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        self._bm_segments = None  # only the policy forward of this _compute_loss call is split
        if args:
            raise RuntimeError("unexpected positional arguments to _get_per_token_logps_and_entropies while splitting by task")
        if any(kwargs.get(k) is not None for k in _MULTIMODAL_KEYS):
            raise NotImplementedError("cannot split a multimodal micro-batch by task")
        compute_entropy = kwargs.get("compute_entropy", False)
        kwargs = dict(kwargs, compute_aux_loss=False)
        logps_parts, ent_parts = [], []
        for name, a, b in segments:
            empty = a == b
            rows = slice(0, 1) if empty else slice(a, b)  # an empty (aligned) segment: one row, weight 0
            logps, ent, _ = super()._get_per_token_logps_and_entropies(
                model, input_ids[rows], attention_mask[rows], logits_to_keep, **kwargs
            )
            self._bm_segment_outputs.append((name, logps, ent))
            if empty:
                continue
            logps_parts.append(logps)
            ent_parts.append(ent)
        entropies = torch.cat(ent_parts, dim=0) if compute_entropy else None
        return torch.cat(logps_parts, dim=0), entropies, None

    # ------------------------------------------------------------------ metrics
    def _bm_reset_step(self) -> None:
        self._bm_step_time = 0.0
        self._bm_step_loss = 0.0
        self._bm_microbatches = 0
        self._bm_split_count = 0
        if hasattr(self, "_bm_stats"):
            self._bm_stats.zero_()

    @torch.no_grad()
    def _bm_accumulate(self, inputs: Mapping[str, Any]) -> None:
        """Add the micro-batch's per-task sums to the step's accumulator (on the inputs' device, no sync)."""
        tid = inputs[TASK_IDS_KEY].detach()
        device = tid.device
        if self._bm_stats.device != device:
            self._bm_stats = self._bm_stats.to(device)
        rows = len(tid)
        rewards = inputs.get(TASK_REWARDS_KEY)
        if rewards is None:
            rewards = torch.full((rows,), float("nan"), dtype=torch.float64, device=device)
        rewards = rewards.detach().to(device, torch.float64)
        valid = ~torch.isnan(rewards)
        r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
        adv = inputs["advantages"].detach().to(device, torch.float64)
        mask = inputs["completion_mask"].detach().to(device, torch.float64)
        if adv.dim() == 2:  # token-level advantages: the row's masked mean
            adv = (adv * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        ones = torch.ones(rows, dtype=torch.float64, device=device)
        cols = torch.stack([ones, valid.to(torch.float64), r0, r0 * r0, adv, adv.abs(), mask.sum(1)], dim=1)
        self._bm_stats.index_add_(0, tid, cols)

    def _bm_task_metrics(self) -> dict[str, float]:
        stats = self._bm_stats
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats.to(self.accelerator.device), reduction="sum")
        stats = stats.cpu()
        out: dict[str, float] = {}
        nan = float("nan")
        for t, name in enumerate(self.task_registry.names):
            n, nr = float(stats[t, _N]), float(stats[t, _NR])
            out[f"num_samples/{name}"] = n
            if n == 0:
                continue
            mean = float(stats[t, _RSUM]) / nr if nr else nan
            var = float(stats[t, _RSQ]) / nr - mean * mean if nr else nan
            out[f"reward/{name}/mean"] = mean
            out[f"reward/{name}/std"] = math.sqrt(max(var, 0.0)) if nr else nan
            out[f"advantage/{name}/mean"] = float(stats[t, _ASUM]) / n
            out[f"advantage/{name}/abs_mean"] = float(stats[t, _AABS]) / n
            out[f"completion_length/{name}/mean"] = float(stats[t, _LSUM]) / n
        return out

    def _bm_on_optimizer_step(self, diagnostics: dict[str, float]) -> None:
        """``BalancedOptimizer.on_step``: push the step's figures into the trainer's metrics and the JSONL."""
        metrics = {k: v for k, v in diagnostics.items() if k != "step"}
        metrics.update(self._bm_task_metrics())
        if self.mixture_sampler is not None:
            metrics.update(self.mixture_sampler.metrics())
        sink = self._metrics["train"]
        level = REPORT_KEY_LEVELS.index(self.balanced.report_keys)
        tracked = dict(metrics, split_microbatches=float(self._bm_split_count))
        for key, value in tracked.items():
            if REPORT_KEY_LEVELS.index(report_key_level(key)) <= level:
                sink[key].append(float(value))
        loss_t = torch.as_tensor(self._bm_step_loss, dtype=torch.float32)
        if self.accelerator.num_processes > 1:
            loss_t = self.accelerator.reduce(loss_t.to(self.accelerator.device), reduction="mean")
        loss = float(loss_t)
        record = dict(metrics)
        record.update(
            {
                "loss": loss,
                "step_time": self._bm_step_time,
                "learning_rate": float(self._bm_opt().param_groups[0]["lr"]),
                "microbatches": float(self._bm_microbatches),
                "split_microbatches": float(self._bm_split_count),
                "optimizer_step": float(diagnostics.get("step", float("nan"))),
            }
        )
        step = self.state.global_step + 1
        record["global_step"] = float(step)
        self.last_balanced_metrics = record
        if self.balanced.write_jsonl:
            self._bm_log(record, step)
        self._bm_reset_step()

    def _bm_log(self, record: Mapping[str, float], step: int) -> None:
        if self._bm_jsonl is None:
            path = self.metrics_path
            main = self.accelerator.is_main_process
            resume = self._bm_resume_step
            if resume is not None and main:
                # a resumed run: keep the steps up to the checkpoint, drop those it redoes, append
                dropped = truncate_after_step(path, resume)
                if dropped:
                    logger.info("resuming at step %d: dropped %d line(s) past it from %s", resume, dropped, path)
                kept = [r.get("step") for r in _tail_records(path)]
                if not kept or kept[-1] != resume:
                    logger.warning(
                        "resuming at step %d, but %s ends at step %s: the steps in between are missing from the log",
                        resume, path, kept[-1] if kept else None,
                    )
            self._bm_jsonl = JSONLLogger(path, overwrite=resume is None, main_process=main)
        self._bm_jsonl.log(record, step=step)

    @property
    def metrics_path(self) -> str:
        """Path of this run's JSONL metrics file (``<log_dir>/metrics.jsonl``)."""
        return os.path.join(self.balanced.log_dir or self.args.output_dir, METRICS_FILENAME)

    def _bm_after_step(self) -> None:
        """After every optimizer step: drop captured gradients of a step the optimizer skipped."""
        opt = self.balanced_optimizer
        if opt is not None and opt.buffers.used:
            logger.warning("optimizer step %d was skipped (AMP overflow?); dropping its captured task gradients", self.state.global_step)
            opt.zero_grad()
            self._bm_reset_step()

    def _bm_close_log(self) -> None:
        if self._bm_jsonl is not None:
            self._bm_jsonl.close()
            self._bm_jsonl = None


class BalancedGRPOTrainer(BalancedGRPOMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with balancedmix: per-task gradient diagnostics, corrections and mixtures.

    Takes every ``GRPOTrainer`` argument unchanged, plus ``balanced=BalancedConfig(...)`` (or
    its fields as keywords) and ``optimizer_cls_and_kwargs``. See :class:`BalancedGRPOMixin`.
    """
