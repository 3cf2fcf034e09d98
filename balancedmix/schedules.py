"""Mixture schedules: how much of each task goes into each generation batch.

A schedule is a small stateful object that :class:`~balancedmix.sampler.MixtureSampler` asks for
the task weights of every batch it draws:

* ``bind(tasks, sizes)`` — called once by the sampler with the task names (in registry order) and
  the number of prompts of each task in the dataset.
* ``weights(step) -> dict[task, float]`` — the weights of batch ``step`` (the sampler's global
  batch index, counted from 0 across epochs). Non-negative, finite, not all zero; they need not sum
  to 1 (the sampler normalises them). Must be a pure function of ``step`` and the schedule's state.
* ``update(metrics)`` — feed a flat dict of floats (``BalancedOptimizer.diagnostics()`` keys such
  as ``update_share/<task>``, plus ``reward/<task>/mean``). Fixed policies ignore it.
* ``state_dict()`` / ``load_state_dict()`` — plain Python values (JSON-friendly).

Rank consistency. Every rank builds the same schedule and feeds it the same metrics, so every rank
computes the same weights. This holds only if the metrics are identical on every rank: the
diagnostics of :class:`~balancedmix.optimizer.BalancedOptimizer` are computed from all-reduced
buffers, and per-task reward means must be computed from the gathered (global) rewards, never from
one process's slice. Adaptive schedules read nothing else (no clock, no local RNG, no local data).

Lag. The sampler asks for the weights of batch ``b`` when it draws batch ``b``, i.e. when the
DataLoader first reads an index of that batch, which is ahead of training (see
``docs/sampling.md``): in a TRL run the weights of generation batch ``b`` are computed during the
last optimizer step of batch ``b - 1`` and reflect the metrics of the steps before it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

from .tasks import TaskError, UnknownTaskError

__all__ = [
    "MixtureSchedule",
    "Fixed",
    "SizeProportional",
    "Temperature",
    "GradientShare",
    "LearningProgress",
    "WorstTask",
    "WeightsError",
    "validate_weights",
    "as_schedule",
]

logger = logging.getLogger(__name__)


class WeightsError(TaskError):
    """Invalid mixture weights (negative, non-finite, all zero, or for an unknown task)."""


def validate_weights(weights: Mapping[str, float], tasks: Sequence[str], *, where: str = "weights") -> dict[str, float]:
    """Check ``weights`` against ``tasks`` and return a full dict (missing tasks get weight 0).

    Raises:
        UnknownTaskError: a weight names a task that is not in ``tasks``.
        WeightsError: a weight is not a real number, is negative or non-finite, or all are zero.
    """
    if not isinstance(weights, Mapping):
        raise WeightsError(f"{where} must be a mapping task -> weight, got {type(weights).__name__}")
    known = set(tasks)
    for name in weights:
        if name not in known:
            raise UnknownTaskError(f"{where} name unknown task {name!r}; the tasks are {list(tasks)}")
    out: dict[str, float] = {}
    for name in tasks:
        raw = weights.get(name, 0.0)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            try:
                value = float(raw)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise WeightsError(f"{where}: weight of task {name!r} is {raw!r}, not a number") from None
        else:
            value = float(raw)
        if not math.isfinite(value):
            raise WeightsError(f"{where}: weight of task {name!r} is {value}, not finite")
        if value < 0:
            raise WeightsError(f"{where}: weight of task {name!r} is negative ({value})")
        out[name] = value
    if not any(v > 0 for v in out.values()):
        raise WeightsError(f"{where}: all weights are zero ({out}); at least one task needs a positive weight")
    return out


def _normalise(raw: Mapping[str, float]) -> dict[str, float]:
    total = math.fsum(raw.values())
    return {k: v / total for k, v in raw.items()}


class MixtureSchedule:
    """Base class of mixture schedules (see the module docstring for the protocol)."""

    def __init__(self) -> None:
        self._tasks: tuple[str, ...] | None = None
        self._sizes: dict[str, int] = {}
        self.num_updates = 0
        """Number of ``update()`` calls that changed the schedule's state."""

    # -- binding -----------------------------------------------------------------------------
    def bind(self, tasks: Sequence[str], sizes: Mapping[str, int]) -> None:
        """Attach the schedule to a task list and the dataset's per-task prompt counts.

        Re-binding to the same tasks is allowed (sizes may change); other tasks raise.
        """
        tasks = tuple(tasks)
        if self._tasks is not None and self._tasks != tasks:
            raise TaskError(f"{type(self).__name__} is bound to tasks {list(self._tasks)}, not {list(tasks)}")
        for t in tasks:
            if t not in sizes:
                raise TaskError(f"no size given for task {t!r}")
        self._tasks = tasks
        self._sizes = {t: int(sizes[t]) for t in tasks}
        self._on_bind()

    def _on_bind(self) -> None:
        """Hook for subclasses (validate options against the tasks)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        if self._tasks is None:
            raise TaskError(f"{type(self).__name__} is not bound to tasks yet; MixtureSampler calls bind()")
        return self._tasks

    # -- protocol ----------------------------------------------------------------------------
    def weights(self, step: int) -> dict[str, float]:
        """Weights of batch ``step`` (un-normalised, non-negative), one entry per task."""
        raise NotImplementedError

    def update(self, metrics: Mapping[str, float]) -> None:
        """Consume rank-identical metrics. Fixed schedules ignore them."""

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type") != type(self).__name__:
            raise TaskError(f"state of a {state.get('type')} schedule cannot be loaded into {type(self).__name__}")
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Fixed(MixtureSchedule):
    """Constant weights ``w_t`` (normalised by the sampler: ``p_t = w_t / Σ_s w_s``).

    Tasks missing from ``weights`` get weight 0 and are never sampled.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        if not isinstance(weights, Mapping):
            raise WeightsError(f"Fixed needs a mapping task -> weight, got {type(weights).__name__}")
        self._raw = dict(weights)

    def _on_bind(self) -> None:
        self._weights = validate_weights(self._raw, self.tasks)

    def weights(self, step: int) -> dict[str, float]:
        if self._tasks is None:
            raise TaskError("Fixed is not bound to tasks yet; MixtureSampler calls bind()")
        return dict(self._weights)

    def __repr__(self) -> str:
        return f"Fixed({self._raw!r})"


class Temperature(MixtureSchedule):
    """Temperature sampling: ``p_t ∝ n_t^(1/tau)`` with ``n_t`` the task's prompt count.

    ``tau=1`` is size-proportional (the plain shuffle), ``tau → ∞`` is uniform over tasks,
    ``tau < 1`` sharpens towards the largest task. Computed in log space (no overflow).
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        tau = float(tau)
        if not (math.isfinite(tau) and tau > 0):
            raise WeightsError(f"Temperature tau must be a positive finite number, got {tau}")
        self.tau = tau

    def _on_bind(self) -> None:
        logs = {t: math.log(n) / self.tau for t, n in self._sizes.items() if n > 0}
        if not logs:
            raise WeightsError("every task has 0 prompts")
        top = max(logs.values())
        self._weights = {t: (math.exp(logs[t] - top) if t in logs else 0.0) for t in self.tasks}

    def weights(self, step: int) -> dict[str, float]:
        if self._tasks is None:
            raise TaskError(f"{type(self).__name__} is not bound to tasks yet; MixtureSampler calls bind()")
        return dict(self._weights)

    def __repr__(self) -> str:
        return f"Temperature(tau={self.tau})"


class SizeProportional(Temperature):
    """``p_t = n_t / N``: the task mixture of a plain uniform shuffle of the dataset.

    The weights are the integer sizes themselves, so the sampler's rounding is exact: over
    ``N // B`` batches with ``N % B == 0`` every prompt is drawn exactly once (see the sampler).
    """

    def __init__(self) -> None:
        super().__init__(tau=1.0)

    def _on_bind(self) -> None:
        if not any(n > 0 for n in self._sizes.values()):
            raise WeightsError("every task has 0 prompts")
        self._weights = {t: float(self._sizes[t]) for t in self.tasks}

    def __repr__(self) -> str:
        return "SizeProportional()"


def _check_fraction(name: str, value: float, *, upper: float = 1.0, allow_upper: bool = False) -> float:
    value = float(value)
    ok = math.isfinite(value) and 0 <= value and (value <= upper if allow_upper else value < upper)
    if not ok:
        bound = f"[0, {upper}]" if allow_upper else f"[0, {upper})"
        raise WeightsError(f"{name} must be in {bound}, got {value}")
    return value


def _metric(metrics: Mapping[str, float], key: str) -> float | None:
    """A finite float from ``metrics[key]``, or None when it is absent or not finite."""
    if key not in metrics:
        return None
    try:
        value = float(metrics[key])
    except (TypeError, ValueError):
        raise WeightsError(f"metric {key!r} is {metrics[key]!r}, not a number") from None
    if not math.isfinite(value):
        logger.warning("ignoring non-finite metric %s=%s", key, value)
        return None
    return value


def _with_floor(probs: Mapping[str, float], floor: float) -> dict[str, float]:
    """``floor + (1 - K·floor) · p_t``: every task keeps at least ``floor``."""
    k = len(probs)
    return {t: floor + (1.0 - k * floor) * p for t, p in probs.items()}


class _Adaptive(MixtureSchedule):
    """Shared machinery of the adaptive schedules: a floor, a weight vector, its state."""

    def __init__(self, floor: float) -> None:
        super().__init__()
        self.floor = _check_fraction("floor", floor)
        self._w: dict[str, float] = {}

    def _on_bind(self) -> None:
        k = len(self.tasks)
        if self.floor * k > 1.0:
            raise WeightsError(f"floor={self.floor} times {k} tasks exceeds 1; use floor <= {1.0 / k}")
        if set(self._w) != set(self.tasks):
            self._w = {t: 1.0 / k for t in self.tasks}

    def weights(self, step: int) -> dict[str, float]:
        if self._tasks is None:
            raise TaskError(f"{type(self).__name__} is not bound to tasks yet; MixtureSampler calls bind()")
        return dict(self._w)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "weights": dict(self._w), **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        w = {str(k): float(v) for k, v in state["weights"].items()}
        if self._tasks is not None:
            validate_weights(w, self.tasks, where=f"saved {type(self).__name__} weights")
        self._w = w
        self._load_extra(state)


class GradientShare(_Adaptive):
    """Move each task's share of the update toward a target by changing its data weight.

    Reads ``update_share/<task>`` (``<G_t, G> / ||G||²`` from ``BalancedOptimizer.diagnostics()``),
    smooths it, ``s̄_t ← β s̄_t + (1 - β) s_t``, and updates multiplicatively:

        w_t ← w_t · clip((target_t / max(s̄_t, eps)) ^ rate, 1/max_step, max_step)

    then renormalises and applies the floor, ``w_t ← floor + (1 - K·floor) · w_t / Σ w``.
    A task's share grows roughly in proportion to its number of prompts in the batch, so the
    fixed point is ``s̄_t = target_t``: with ``target="equal"`` every task contributes the same
    share of the update — the data-level counterpart of the ``normalize`` gradient method.
    Use it with ``method="sum"`` (the shares must describe the uncorrected update).
    Tasks absent from ``metrics`` keep their weight.

    Args:
        target: ``"equal"`` (``1/K`` each) or a mapping task -> target share (normalised).
        rate: exponent of the multiplicative step (0 < rate), 0.5 by default.
        smoothing: EMA coefficient β in [0, 1) for the shares.
        floor: minimum probability of every task.
        max_step: bound on the per-update weight ratio (> 1).
        eps: shares below ``eps`` (including negative shares) count as ``eps``.
        key: metric name template.
    """

    def __init__(
        self,
        target: Union[str, Mapping[str, float]] = "equal",
        *,
        rate: float = 0.5,
        smoothing: float = 0.5,
        floor: float = 0.02,
        max_step: float = 2.0,
        eps: float = 1e-3,
        key: str = "update_share/{task}",
    ) -> None:
        super().__init__(floor)
        if not (isinstance(target, str) and target == "equal") and not isinstance(target, Mapping):
            raise WeightsError(f"target must be 'equal' or a mapping task -> share, got {target!r}")
        self.target_spec = target
        self.rate = float(rate)
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise WeightsError(f"rate must be positive, got {rate}")
        self.smoothing = _check_fraction("smoothing", smoothing)
        self.max_step = float(max_step)
        if not (math.isfinite(self.max_step) and self.max_step > 1):
            raise WeightsError(f"max_step must be > 1, got {max_step}")
        self.eps = float(eps)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise WeightsError(f"eps must be positive, got {eps}")
        self.key = key
        self._share: dict[str, float] = {}

    def _on_bind(self) -> None:
        super()._on_bind()
        if isinstance(self.target_spec, str):
            self.target = {t: 1.0 / len(self.tasks) for t in self.tasks}
        else:
            full = validate_weights(self.target_spec, self.tasks, where="GradientShare target")
            self.target = _normalise(full)

    def update(self, metrics: Mapping[str, float]) -> None:
        tasks = self.tasks
        seen = {t: v for t in tasks if (v := _metric(metrics, self.key.format(task=t))) is not None}
        if not seen:
            logger.debug("GradientShare.update: no %s metric in %d keys", self.key, len(metrics))
            return
        for t, s in seen.items():
            prev = self._share.get(t)
            self._share[t] = s if prev is None else self.smoothing * prev + (1 - self.smoothing) * s
        raw = dict(self._w)
        for t in seen:
            ratio = (self.target[t] / max(self._share[t], self.eps)) ** self.rate if self.target[t] > 0 else 0.0
            raw[t] = self._w[t] * min(max(ratio, 1.0 / self.max_step), self.max_step)
        if not any(v > 0 for v in raw.values()):
            raw = {t: 1.0 for t in tasks}
        self._w = _with_floor(_normalise(raw), self.floor)
        self.num_updates += 1

    def _extra_state(self) -> dict[str, Any]:
        return {"share_ema": dict(self._share)}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self._share = {str(k): float(v) for k, v in state.get("share_ema", {}).items()}

    def __repr__(self) -> str:
        return f"GradientShare(target={self.target_spec!r}, rate={self.rate}, smoothing={self.smoothing}, floor={self.floor})"


class _RewardEMA(_Adaptive):
    """Adaptive schedules driven by per-task reward means ``reward/<task>/mean``."""

    def __init__(self, floor: float, key: str) -> None:
        super().__init__(floor)
        self.key = key

    def _rewards(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {t: v for t in self.tasks if (v := _metric(metrics, self.key.format(task=t))) is not None}


class LearningProgress(_RewardEMA):
    """Bandit on absolute learning progress (a teacher–student curriculum).

    Per task, two EMAs of the reward mean ``r_t``: fast ``f_t ← β_f f_t + (1-β_f) r_t`` and slow
    ``g_t ← β_s g_t + (1-β_s) r_t`` (both start at the first observation). Learning progress
    ``LP_t = |f_t - g_t|`` (improving or forgetting both count). Weights:

        w_t = floor + (1 - K·floor) · LP_t / Σ_s LP_s      (uniform when Σ LP = 0)

    A task never observed yet gets the largest LP of the others (optimism, so it is explored).
    The floor is the exploration rate of the bandit.
    """

    def __init__(
        self, *, fast: float = 0.5, slow: float = 0.9, floor: float = 0.05, key: str = "reward/{task}/mean"
    ) -> None:
        super().__init__(floor, key)
        self.fast = _check_fraction("fast", fast)
        self.slow = _check_fraction("slow", slow)
        if self.fast >= self.slow:
            raise WeightsError(f"fast={fast} must be smaller than slow={slow} (fast reacts more)")
        self._fast: dict[str, float] = {}
        self._slow: dict[str, float] = {}

    def progress(self) -> dict[str, float]:
        """Current ``LP_t`` per observed task."""
        return {t: abs(self._fast[t] - self._slow[t]) for t in self._fast}

    def update(self, metrics: Mapping[str, float]) -> None:
        rewards = self._rewards(metrics)
        if not rewards:
            return
        for t, r in rewards.items():
            if t not in self._fast:
                self._fast[t] = self._slow[t] = r
            else:
                self._fast[t] = self.fast * self._fast[t] + (1 - self.fast) * r
                self._slow[t] = self.slow * self._slow[t] + (1 - self.slow) * r
        lp = self.progress()
        best = max(lp.values())
        full = {t: lp.get(t, best) for t in self.tasks}
        total = math.fsum(full.values())
        probs = _normalise(full) if total > 0 else {t: 1.0 / len(self.tasks) for t in self.tasks}
        self._w = _with_floor(probs, self.floor)
        self.num_updates += 1

    def _extra_state(self) -> dict[str, Any]:
        return {"fast_ema": dict(self._fast), "slow_ema": dict(self._slow)}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self._fast = {str(k): float(v) for k, v in state.get("fast_ema", {}).items()}
        self._slow = {str(k): float(v) for k, v in state.get("slow_ema", {}).items()}

    def __repr__(self) -> str:
        return f"LearningProgress(fast={self.fast}, slow={self.slow}, floor={self.floor})"


class WorstTask(_RewardEMA):
    """More data for the tasks with the lowest recent reward.

    ``r̄_t ← β r̄_t + (1-β) r_t`` (starting at the first observation), then

        w_t = floor + (1 - K·floor) · softmax(-r̄ / temperature)_t

    ``temperature → 0`` puts all the non-floor mass on the worst task; large temperatures approach
    uniform. Rewards are in the reward functions' units, so pick the temperature on that scale.
    A task never observed yet counts as the worst one seen (it is explored first).
    """

    def __init__(
        self, *, temperature: float = 0.1, smoothing: float = 0.8, floor: float = 0.05, key: str = "reward/{task}/mean"
    ) -> None:
        super().__init__(floor, key)
        self.temperature = float(temperature)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise WeightsError(f"temperature must be positive, got {temperature}")
        self.smoothing = _check_fraction("smoothing", smoothing)
        self._ema: dict[str, float] = {}

    def update(self, metrics: Mapping[str, float]) -> None:
        rewards = self._rewards(metrics)
        if not rewards:
            return
        for t, r in rewards.items():
            prev = self._ema.get(t)
            self._ema[t] = r if prev is None else self.smoothing * prev + (1 - self.smoothing) * r
        worst = min(self._ema.values())
        z = {t: -self._ema.get(t, worst) / self.temperature for t in self.tasks}
        top = max(z.values())
        self._w = _with_floor(_normalise({t: math.exp(v - top) for t, v in z.items()}), self.floor)
        self.num_updates += 1

    def _extra_state(self) -> dict[str, Any]:
        return {"reward_ema": dict(self._ema)}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self._ema = {str(k): float(v) for k, v in state.get("reward_ema", {}).items()}

    def __repr__(self) -> str:
        return f"WorstTask(temperature={self.temperature}, smoothing={self.smoothing}, floor={self.floor})"


def as_schedule(weights: Union[None, Mapping[str, float], MixtureSchedule, Any]) -> MixtureSchedule:
    """``None`` → :class:`SizeProportional`; a mapping → :class:`Fixed`; a schedule as is.

    Any object with callable ``weights(step)`` and ``update(metrics)`` is accepted (duck typing);
    it is wrapped so that the sampler can bind and checkpoint it.
    """
    if weights is None:
        return SizeProportional()
    if isinstance(weights, MixtureSchedule):
        return weights
    if isinstance(weights, Mapping):
        return Fixed(weights)
    if callable(getattr(weights, "weights", None)) and callable(getattr(weights, "update", None)):
        return _Foreign(weights)
    raise WeightsError(
        f"weights must be a mapping task -> weight, a schedule with weights(step)/update(metrics), or None; "
        f"got {type(weights).__name__}"
    )


class _Foreign(MixtureSchedule):
    """Adapter for a user object that follows the protocol without subclassing."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def _on_bind(self) -> None:
        bind = getattr(self.inner, "bind", None)
        if callable(bind):
            bind(self.tasks, dict(self._sizes))

    def weights(self, step: int) -> dict[str, float]:
        return dict(self.inner.weights(step))

    def update(self, metrics: Mapping[str, float]) -> None:
        self.inner.update(metrics)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        inner = self.inner.state_dict() if callable(getattr(self.inner, "state_dict", None)) else None
        return {**super().state_dict(), "inner": inner}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("inner") is not None and callable(getattr(self.inner, "load_state_dict", None)):
            self.inner.load_state_dict(state["inner"])

    def __repr__(self) -> str:
        return f"{type(self.inner).__name__}(...)"
