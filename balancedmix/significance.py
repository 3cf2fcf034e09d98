"""Paired comparisons of runs with confidence intervals, and the paper's windowed learning gain.

Pure numpy, no torch: it reads per-prompt evaluation scores and training-reward series.

The comparison design (``docs/significance.md`` has the derivation):

- Every method is trained with the same ``S`` seeds and evaluated on the **same** held-out prompts,
  so for task ``t``, seed ``s`` and prompt ``i`` the difference ``d[s, i] = y_treated − y_baseline``
  is *paired*: prompt difficulty cancels.
- The estimate of a task's effect is the mean of ``d`` over seeds and prompts. Two independent
  sources of error remain: which seeds were drawn (training randomness) and which prompts were
  drawn (evaluation sampling). They are *crossed* (every seed sees every prompt): the variance of
  the mean comes from the two-way random-effects (ANOVA) decomposition, estimated without bias
  from the seed, prompt and residual mean squares, and the interval is Student's t with
  Satterthwaite's degrees of freedom. The same decomposition covers any linear statistic across
  tasks (mean over tasks, worst task), keeping the seed correlation between tasks.
- A verdict is stated only when the interval excludes zero.

With one seed the seed component cannot be estimated: the interval covers evaluation noise only
and says so (``PairedInterval.seeds == 1``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "PairedInterval",
    "PairedComparison",
    "paired_comparison",
    "t_quantile",
    "windowed_gain",
]


@dataclass(frozen=True)
class PairedInterval:
    """A difference ``treated − baseline`` with its bootstrap confidence interval.

    ``estimate``, ``low`` and ``high`` are in the scores' units (accuracy: a fraction in [−1, 1]).
    ``seeds`` and ``prompts`` say what the interval resampled (prompts: per task, the smallest).
    """

    estimate: float
    low: float
    high: float
    level: float
    seeds: int
    prompts: int

    @property
    def verdict(self) -> str:
        """``"better"`` / ``"worse"`` when the interval excludes zero, else ``"undecided"``."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "undecided"

    @property
    def half_width(self) -> float:
        """Half the interval's width, in the scores' units."""
        return (self.high - self.low) / 2

    def describe(self) -> str:
        """``+0.031 [+0.004, +0.058]`` — the estimate and its interval, signed, 3 decimals."""
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


@dataclass(frozen=True)
class PairedComparison:
    """Per task, mean over tasks and worst task: the treated run's difference to the baseline."""

    tasks: dict[str, PairedInterval]
    mean: PairedInterval
    worst: PairedInterval


def _as_scores(name: str, task: str, value: object) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} scores of task {task!r} must be [seeds, prompts] with both >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} scores of task {task!r} contain NaN or Inf")
    return arr


def _t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)


def _t_cdf(x: float, df: float) -> float:
    # With x = √df·tan θ the density times dx is c·√df·cos^(df−1) θ dθ: a smooth integrand on the
    # bounded interval [0, atan(x/√df)], which Gauss–Legendre integrates to ~1e-13 even far in the tail.
    theta_max = math.atan(x / math.sqrt(df))
    theta = 0.5 * theta_max * (_GL_NODES + 1)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(math.pi)
    return 0.5 + 0.5 * theta_max * math.exp(log_c) * float((_GL_WEIGHTS * np.cos(theta) ** (df - 1)).sum())


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (``df`` may be fractional, ≥ 1).

    Exact for ``df`` = 1 and 2 and ``df`` = inf (normal); otherwise the Cornish–Fisher start of
    Abramowitz & Stegun 26.7.5 refined by Newton steps on the CDF (tested against scipy to 1e-7
    relative for p in [0.001, 0.999]; intervals use p = 0.5 + level/2).
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df >= 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    z = NormalDist().inv_cdf(p)
    if math.isinf(df):
        return z
    x = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    for _ in range(8):
        step = (_t_cdf(x, df) - p) / float(_t_pdf(np.array(x), df))
        x -= step
        if abs(step) < 1e-12 * max(1.0, abs(x)):
            break
    return x


def _linear_interval(
    weights_t: Mapping[str, float],
    weights_b: Mapping[str, float],
    t_scores: Mapping[str, np.ndarray],
    b_scores: Mapping[str, np.ndarray],
    level: float,
) -> PairedInterval:
    """Interval of ``L = Σ_t α_t mean(T_t) − β_t mean(B_t)`` under the crossed seeds × prompts model.

    ``z[t,s,i] = α_t T[t,s,i] − β_t B[t,s,i] = μ_t + a[t,s] + b[t,i] + e[t,s,i]`` with seed effects
    ``a`` (correlated across tasks: one training run per seed), prompt effects ``b`` (independent
    across tasks) and residuals ``e``. ``Var L = Var(Σ_t ā_t) + Σ_t σ_b,t²/N_t + Σ_t σ_e,t²/(S N_t)``,
    estimated without bias by

    - ``V_seed``: the variance over seeds of ``m_s = Σ_t mean_i z[t,s,i]``, over ``S``
      (it also holds ``Σ_t σ_e,t²/(S N_t)``),
    - ``V_prompt,t``: the variance over prompts of ``mean_s z[t,s,i]``, over ``N_t``
      (it also holds ``σ_e,t²/(S N_t)``),
    - minus the residual term counted twice: ``Σ_t MS_e,t / (S N_t)`` (two-way ANOVA residual).

    Degrees of freedom: Satterthwaite over the three terms. With one seed the seed term cannot be
    separated from the residual: ``V = Σ_t V_prompt,t`` (evaluation noise only), ``df`` over prompts.
    """
    tasks = [t for t in t_scores if weights_t.get(t, 0.0) or weights_b.get(t, 0.0)]
    z = {t: weights_t.get(t, 0.0) * t_scores[t] - weights_b.get(t, 0.0) * b_scores[t] for t in tasks}
    estimate = float(sum(z[t].mean() for t in tasks))
    num_seeds = next(iter(t_scores.values())).shape[0]
    terms: list[tuple[float, float]] = []  # (variance term, its degrees of freedom)
    prompt_var = 0.0
    prompt_terms = []
    for t in tasks:
        n = z[t].shape[1]
        if n > 1:
            v = float(z[t].mean(axis=0).var(ddof=1)) / n
            prompt_var += v
            prompt_terms.append((v, n - 1.0))
    resid = 0.0
    resid_terms = []
    if num_seeds > 1:
        m = sum(z[t].mean(axis=1) for t in tasks)
        seed_var = float(np.var(m, ddof=1)) / num_seeds
        terms.append((seed_var, num_seeds - 1.0))
        for t in tasks:
            n = z[t].shape[1]
            if n > 1:
                r = z[t] - z[t].mean(axis=1, keepdims=True) - z[t].mean(axis=0, keepdims=True) + z[t].mean()
                ms_e = float((r**2).sum()) / ((num_seeds - 1) * (n - 1))
                term = ms_e / (num_seeds * n)
                resid += term
                resid_terms.append((term, (num_seeds - 1.0) * (n - 1.0)))
    terms += prompt_terms
    variance = sum(v for v, _ in terms) - resid
    # The true variance is at least the residual's share; a moment estimate can fall below it.
    variance = max(variance, resid)
    denom = sum(v**2 / d for v, d in terms + resid_terms if d > 0)
    df = variance**2 / denom if denom > 0 else math.inf
    df = max(df, 1.0)
    prompts = min(z[t].shape[1] for t in tasks)
    if variance <= 0:
        return PairedInterval(estimate, estimate, estimate, level, num_seeds, prompts)
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(variance)
    return PairedInterval(estimate, estimate - half, estimate + half, level, num_seeds, prompts)


def paired_comparison(
    treated: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
    baseline: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
    *,
    level: float = 0.95,
) -> PairedComparison:
    """Paired difference ``treated − baseline`` per task, for the task mean and the worst task.

    Args:
        treated, baseline: ``{task: scores}`` with ``scores`` of shape ``[S, N_t]`` (seeds × the
            task's held-out prompts; a 1-D ``[N_t]`` means one seed). Row ``s`` of both must come
            from the same seed and column ``i`` from the same prompt: that is the pairing. Scores
            are per-prompt values (exact match 0/1, or a reward).
        level: the interval's coverage, in (0, 1).

    Returns:
        A :class:`PairedComparison`: per task the difference of mean scores; ``mean`` the
        difference of the unweighted mean over tasks; ``worst`` the difference of the lowest
        per-task mean (each run's own worst task, as a user reads two tables; the interval treats
        which task is worst as known).

    Raises:
        ValueError: different task sets, shapes that do not pair, non-finite scores, a bad level.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if set(treated) != set(baseline):
        raise ValueError(f"the runs have different tasks: {sorted(treated)} vs {sorted(baseline)}")
    if not treated:
        raise ValueError("no tasks to compare")
    tasks = list(treated)
    t_scores = {t: _as_scores("treated", t, treated[t]) for t in tasks}
    b_scores = {t: _as_scores("baseline", t, baseline[t]) for t in tasks}
    for t in tasks:
        if t_scores[t].shape != b_scores[t].shape:
            raise ValueError(
                f"task {t!r}: treated scores have shape {t_scores[t].shape}, baseline {b_scores[t].shape}; "
                "paired comparison needs the same seeds and the same prompts in both runs"
            )
    seeds = {t_scores[t].shape[0] for t in tasks}
    if len(seeds) != 1:
        raise ValueError(f"every task needs the same number of seeds, got {sorted(seeds)}")

    per_task = {t: _linear_interval({t: 1.0}, {t: 1.0}, t_scores, b_scores, level) for t in tasks}
    equal = {t: 1.0 / len(tasks) for t in tasks}
    mean = _linear_interval(equal, equal, t_scores, b_scores, level)
    worst_t = min(tasks, key=lambda t: t_scores[t].mean())
    worst_b = min(tasks, key=lambda t: b_scores[t].mean())
    worst = _linear_interval({worst_t: 1.0}, {worst_b: 1.0}, t_scores, b_scores, level)
    return PairedComparison(per_task, mean, worst)


def windowed_gain(rewards: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """The paper's learning gain: ``Gain(t) = mean(R[t+1..t+s]) − mean(R[t−s..t−1])``.

    Args:
        rewards: ``[T]`` one task's mean training reward per step, in step order (NaN where the
            task was absent from a step: a window's mean skips them; a window with no finite
            value gives NaN).
        window: ``s`` ≥ 1, in steps.

    Returns:
        ``float64 [T]``: ``Gain(t)`` at step index ``t``; NaN where either window would run past
        the series (``t < s`` or ``t > T − s − 1``).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 step, got {window}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be a 1-D series, got shape {r.shape}")
    n = len(r)
    out = np.full(n, np.nan)
    if n < 2 * window + 1:
        return out
    finite = np.isfinite(r)
    vals = np.where(finite, r, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(vals)])
    ccnt = np.concatenate([[0], np.cumsum(finite)])
    t = np.arange(window, n - window)
    after_sum, after_cnt = csum[t + window + 1] - csum[t + 1], ccnt[t + window + 1] - ccnt[t + 1]
    before_sum, before_cnt = csum[t] - csum[t - window], ccnt[t] - ccnt[t - window]
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = after_sum / after_cnt - before_sum / before_cnt
    out[t] = np.where((after_cnt > 0) & (before_cnt > 0), gain, np.nan)
    return out
