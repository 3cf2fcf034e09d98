"""Training-step runners: plain optimizer, BalancedOptimizer, and the anchors.

Every runner trains its own copy of the same model (same seed) on the same step data: the
``Workload``'s M micro-batches, micro-batch ``m`` belonging to task ``m mod K``.

- ``plain``: forward + backward per micro-batch (loss / M), one AdamW step.
- ``balanced``: the same inside ``with opt.task(name)`` blocks of a ``BalancedOptimizer``.
- ``reference_pcgrad``: the common PCGrad optimizer-wrapper approach, written here after the
  published reference algorithm (Yu et al. 2020, and the Pytorch-PCGrad wrapper): the samples
  are regrouped into M *mixed* chunks (sample ``i`` of chunk ``c`` is the step's sample
  ``c + i·M``, so each chunk mixes tasks, the setting those wrappers target); per chunk one
  forward, one masked loss per task and one backward per task with ``retain_graph`` (all K,
  as the wrapper does for every objective),
  each task's flattened gradient accumulated into a ``[K, P]`` matrix; then the pairwise
  projections on the flattened vectors (random order per task, projection only on conflict),
  the sum written back to ``p.grad``, one AdamW step.
- ``torchjd``: the same mixed chunks; per chunk ``torchjd.autojac.mtl_backward`` on the K task
  losses with the logits as the shared features (an LM has no task-specific head, so every
  parameter is shared), which accumulates ``.jac`` ``[K, *p.shape]``; then ``jac_to_grad`` with
  torchjd's aggregator (``PCGrad``, ``UPGrad``, ``MGDA``), one AdamW step.
- ``libmtl``: LibMTL's weighting class (``LibMTL.weighting.PCGrad`` ...) driven the way its
  ``Trainer`` drives it — as a mixin of the model object providing ``get_share_params``,
  ``zero_grad_share_params``, ``task_num``, ``device``, ``rep_grad`` — on one forward of the
  whole step's batch (its API takes the K losses of one batch; no accumulation).

The per-sample loss is normalised identically everywhere (token-mean over a micro-batch / M),
so all runners compute the same per-task gradients ``G_t`` and, where the algorithm is the
same, the same update.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .common import ModelSpec, Runner, Workload, build_model, flat_grad, make_microbatches, task_names, token_ce

__all__ = [
    "CaptureOptimizer",
    "plain_runner",
    "balanced_runner",
    "reference_pcgrad_runner",
    "torchjd_runner",
    "libmtl_runner",
    "load_libmtl_weighting",
    "fixed_task_order",
    "reference_pcgrad_combine",
]


_FIXED_ORDER = [False]  # set by fixed_task_order(): the reference then skips its shuffle


class CaptureOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step()`` only records the flattened gradient (float64, CPU).

    Used for the agreement checks: every implementation's combined update is compared before
    any optimizer state can differ.
    """

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.captured: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        self.captured = flat_grad([p for g in self.param_groups for p in g["params"]])


def _inner(model: torch.nn.Module, inner: str, lr: float) -> torch.optim.Optimizer:
    if inner == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if inner == "capture":
        return CaptureOptimizer(model.parameters())
    raise ValueError(f"inner optimizer must be 'adamw' or 'capture', got {inner!r}")


class _Setup:
    """Model, micro-batches and their task labels for one runner."""

    def __init__(self, spec: ModelSpec, workload: Workload, k: int, device: str, dtype: torch.dtype, seed: int) -> None:
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        self.model = build_model(spec, device=device, dtype=dtype, seed=seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.mbs = make_microbatches(workload, spec.vocab_size, device=device)
        self.m = workload.num_microbatches
        self.k = k
        self.names = task_names(k)
        self.mb_task = [m % k for m in range(self.m)]
        self.device = device
        # mixed chunks: chunk c holds samples c, c+M, c+2M, ... of the concatenated step batch
        all_ids = torch.cat(self.mbs)  # [M*B, S]
        all_task = torch.tensor([self.mb_task[m] for m in range(self.m) for _ in range(workload.batch)], device=device)
        self.chunks = [(all_ids[c :: self.m], all_task[c :: self.m]) for c in range(self.m)]
        self.all_ids, self.all_task = all_ids, all_task
        # per-sample weight so that Σ_samples of task t == Σ_{mb of t} mean_mb / M
        self.sample_norm = 1.0 / (self.m * workload.batch * (workload.seq - 1))


def plain_runner(
    spec: ModelSpec, workload: Workload, k: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32,
    seed: int = 0, lr: float = 1e-4, inner: str = "adamw",
) -> Runner:
    """The plain optimizer on the same micro-batches (K only labels them; it plays no role here)."""
    s = _Setup(spec, workload, k, device, dtype, seed)
    opt = _inner(s.model, inner, lr)

    def step() -> None:
        for ids in s.mbs:
            (token_ce(s.model, ids).mean() / s.m).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    r = Runner("plain", step, {"impl": "plain", "method": "—", "estimator": "—", "K": k, "P": s.numel, "extra_bytes": 0})
    r.optimizer = opt  # type: ignore[attr-defined]
    return r


def balanced_runner(
    spec: ModelSpec, workload: Workload, k: int, method: str = "sum", estimator: str = "raw",
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, lr: float = 1e-4, inner: str = "adamw",
    capture: str = "hooks", **method_options: Any,
) -> Runner:
    """``BalancedOptimizer(AdamW)`` with task-homogeneous micro-batches (one backward each);
    ``capture="direct"``: autograd accumulates into the task rows (``balancedmix/direct.py``)."""
    from balancedmix import BalancedOptimizer

    s = _Setup(spec, workload, k, device, dtype, seed)
    inner_opt = _inner(s.model, inner, lr)
    opt = BalancedOptimizer(
        inner_opt, tasks=s.names, method=method, estimator=estimator, seed=seed, capture=capture, **method_options
    )
    info: dict[str, Any] = {
        "impl": "balancedmix", "method": method, "estimator": estimator, "capture": capture, "K": k, "P": s.numel
    }

    def step() -> None:
        for ids, t in zip(s.mbs, s.mb_task):
            with opt.task(s.names[t]):
                (token_ce(s.model, ids).mean() / s.m).backward()
        opt.step()
        info["extra_bytes"] = int(opt.buffers.nbytes)
        info["buffer_rows"] = int(opt.buffers.data.shape[0])
        opt.zero_grad(set_to_none=True)

    def close() -> None:
        opt.remove_hooks()

    label = estimator if capture == "hooks" else f"{estimator}, {capture}"
    r = Runner(f"balancedmix {method} ({label})", step, info, close)
    r.optimizer = inner_opt  # type: ignore[attr-defined]
    r.balanced = opt  # type: ignore[attr-defined]
    return r


# ----------------------------------------------------------------------------- reference PCGrad
def reference_pcgrad_combine(grads: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """PCGrad on explicit flattened task gradients ``grads [K, P]``; returns the summed update ``[P]``.

    ``orders[i]`` is the order in which task ``i``'s gradient is projected against the others
    (the reference shuffles it per task and step). A projection happens only on conflict
    (negative inner product), against the *original* gradient ``g_j``; a zero ``g_j`` is skipped.
    """
    pc = grads.clone()
    for i in range(grads.shape[0]):
        for j in orders[i]:
            if j == i:
                continue
            dot = torch.dot(pc[i], grads[j])
            if dot < 0:
                sq = torch.dot(grads[j], grads[j])
                if sq > 0:
                    pc[i] -= (dot / sq) * grads[j]
    return pc.sum(0)


def reference_pcgrad_runner(
    spec: ModelSpec, workload: Workload, k: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
    seed: int = 0, lr: float = 1e-4, inner: str = "adamw",
) -> Runner:
    """The K-backward PCGrad wrapper (see the module docstring)."""
    s = _Setup(spec, workload, k, device, dtype, seed)
    opt = _inner(s.model, inner, lr)
    rng = random.Random(seed)
    p_total = s.numel
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def step() -> None:
        acc = torch.zeros(k, p_total, dtype=acc_dtype, device=device)
        for ids, tasks in s.chunks:
            per_sample = token_ce(s.model, ids).sum(1) * s.sample_norm
            # like the published wrapper: one backward per objective, every objective (a task
            # absent from the chunk has a zero masked loss, its backward still runs)
            for t in range(k):
                for p in s.params:
                    p.grad = None
                (per_sample * (tasks == t)).sum().backward(retain_graph=t < k - 1)
                acc[t] += torch.cat([
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(acc_dtype) for p in s.params
                ])
        orders = []
        for _ in range(k):
            order = list(range(k))
            if not _FIXED_ORDER[0]:
                rng.shuffle(order)
            orders.append(order)
        merged = reference_pcgrad_combine(acc, orders)
        off = 0
        for p in s.params:
            n = p.numel()
            p.grad = merged[off : off + n].view_as(p).to(p.dtype)
            off += n
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"impl": "reference (K backward)", "method": "pcgrad", "estimator": "—", "K": k, "P": p_total,
            "extra_bytes": 2 * k * p_total * 4 + p_total * 4, "extra_bytes_kind": "analytic: acc + projected copy [K,P] fp32 + merged [P]"}
    r = Runner("reference PCGrad (K backward)", step, info)
    r.optimizer = opt  # type: ignore[attr-defined]
    return r


# ----------------------------------------------------------------------------- torchjd
def torchjd_available() -> str | None:
    """torchjd's version, or None when it is not installed."""
    try:
        from importlib.metadata import version

        import torchjd  # noqa: F401

        return version("torchjd")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def torchjd_runner(
    spec: ModelSpec, workload: Workload, k: int, aggregator: str = "PCGrad", device: str = "cpu",
    dtype: torch.dtype = torch.float32, seed: int = 0, lr: float = 1e-4, inner: str = "adamw",
    parallel_chunk_size: int | None = None, aggregator_options: dict[str, Any] | None = None,
) -> Runner:
    """torchjd ``mtl_backward`` (features = logits) + ``jac_to_grad(params, aggregator)``."""
    import torchjd.aggregation as agg_mod
    from torchjd.autojac import jac_to_grad, mtl_backward

    s = _Setup(spec, workload, k, device, dtype, seed)
    opt = _inner(s.model, inner, lr)
    options = dict(aggregator_options or {})
    if "reg_eps" in options:  # agreement checks: a (near) unregularised dual-cone QP
        from torchjd.linalg import QuadprogProjector

        options["projector"] = QuadprogProjector(norm_eps=options.pop("norm_eps", 0.0), reg_eps=options.pop("reg_eps"))
    aggregator_obj = getattr(agg_mod, aggregator)(**options)

    def step() -> None:
        for ids, tasks in s.chunks:
            logits = s.model(input_ids=ids).logits
            # one "task head" per task: the loss on that task's samples only (separate graphs
            # from the shared features, as mtl_backward expects)
            losses = []
            for t in range(k):
                mask = tasks == t
                lg, tgt = logits[mask, :-1], ids[mask, 1:]
                ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1), reduction="sum")
                losses.append(ce * s.sample_norm)
            mtl_backward(losses, features=logits, shared_params=s.params, parallel_chunk_size=parallel_chunk_size)
        jac_to_grad(s.params, aggregator_obj)
        opt.step()
        opt.zero_grad(set_to_none=True)

    item = torch.tensor([], dtype=dtype).element_size()
    info = {"impl": "torchjd", "method": aggregator.lower(), "estimator": "—", "K": k, "P": s.numel,
            "extra_bytes": 2 * k * s.numel * item, "extra_bytes_kind": "analytic: .jac [K,P] + concatenated matrix [K,P]"}
    r = Runner(f"torchjd {aggregator}", step, info)
    r.optimizer = opt  # type: ignore[attr-defined]
    return r


# ----------------------------------------------------------------------------- LibMTL
def load_libmtl_weighting(name: str) -> type:
    """Import ``LibMTL.weighting.<name>`` without running ``LibMTL/__init__.py``.

    The package's ``__init__`` imports its model zoo, which needs torchvision (and LibMTL's
    declared dependencies pull a CUDA torch), so LibMTL is installed with ``--no-deps`` and only
    its weighting modules — which import torch, numpy and scipy only — are loaded. Raises
    ``ImportError`` when LibMTL is not installed.
    """
    loaded = sys.modules.get(f"LibMTL.weighting.{name}")
    if loaded is not None:
        return getattr(loaded, name)
    if "LibMTL" in sys.modules and hasattr(sys.modules["LibMTL"], "__path__"):
        root = Path(list(sys.modules["LibMTL"].__path__)[0])
    else:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("LibMTL is not installed (pip install --no-deps -c constraints.txt LibMTL)")
        root = Path(list(spec.submodule_search_locations)[0])
    for pkg, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
        if pkg not in sys.modules or not hasattr(sys.modules[pkg], "__path__"):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]  # type: ignore[attr-defined]
            sys.modules[pkg] = mod
    module = importlib.import_module(f"LibMTL.weighting.{name}")
    return getattr(module, name)


def libmtl_version() -> str | None:
    try:
        from importlib.metadata import version

        load_libmtl_weighting("PCGrad")
        return version("LibMTL")
    except Exception:  # noqa: BLE001
        return None


def libmtl_runner(
    spec: ModelSpec, workload: Workload, k: int, weighting: str = "PCGrad", device: str = "cpu",
    dtype: torch.dtype = torch.float32, seed: int = 0, lr: float = 1e-4, inner: str = "adamw",
) -> Runner:
    """LibMTL's weighting, driven as its Trainer does, on the whole step batch."""
    cls = load_libmtl_weighting(weighting)
    s = _Setup(spec, workload, k, device, dtype, seed)
    opt = _inner(s.model, inner, lr)

    class Driver(cls):  # type: ignore[misc, valid-type]
        """The attributes LibMTL's Trainer provides to a weighting through its model object."""

        def __init__(self) -> None:
            super().__init__()
            self.task_num = k
            self.device = torch.device(device)
            self.rep_grad = False
            self.task_name = s.names

        def get_share_params(self) -> list[torch.Tensor]:
            return s.params

        def zero_grad_share_params(self) -> None:
            for p in s.params:
                if p.grad is not None:
                    p.grad.zero_()

    driver = Driver()
    py_rng = random.Random(seed)

    def step() -> None:
        per_sample = token_ce(s.model, s.all_ids).sum(1) * s.sample_norm
        losses = [(per_sample * (s.all_task == t)).sum() for t in range(k)]
        state = random.getstate()
        random.setstate(py_rng.getstate())  # LibMTL shuffles with the global `random`
        try:
            driver.backward(losses)
        finally:
            py_rng.setstate(random.getstate())
            random.setstate(state)
        for p in s.params:  # LibMTL writes float32 gradients (its [K, P] matrix's dtype) into p.grad
            if p.grad is not None and p.grad.dtype != p.dtype:
                p.grad = p.grad.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"impl": "LibMTL", "method": weighting.lower(), "estimator": "—", "K": k, "P": s.numel,
            "extra_bytes": 2 * k * s.numel * 4 + s.numel * 4, "extra_bytes_kind": "analytic: grads + pc_grads [K,P] fp32 + new grad [P]"}
    r = Runner(f"LibMTL {weighting}", step, info)
    r.optimizer = opt  # type: ignore[attr-defined]
    return r


# ----------------------------------------------------------------------------- order control
@contextlib.contextmanager
def fixed_task_order() -> Iterator[None]:
    """Make every PCGrad implementation use the identity task order (agreement checks only).

    Patches ``torch.randperm`` (torchjd, and balancedmix if it draws its order with it) to
    return ``arange`` and ``random.shuffle`` (LibMTL, the reference) to leave lists unchanged.
    """
    orig_randperm, orig_shuffle = torch.randperm, random.shuffle

    def randperm(n: int, *args: Any, generator: torch.Generator | None = None, **kw: Any) -> torch.Tensor:
        dtype = kw.get("dtype", torch.int64)
        device = kw.get("device", None)
        return torch.arange(n, dtype=dtype, device=device)

    torch.randperm = randperm  # type: ignore[assignment]
    random.shuffle = lambda x, *a, **k: None  # type: ignore[assignment]
    _FIXED_ORDER[0] = True
    try:
        yield
    finally:
        _FIXED_ORDER[0] = False
        torch.randperm = orig_randperm  # type: ignore[assignment]
        random.shuffle = orig_shuffle  # type: ignore[assignment]
