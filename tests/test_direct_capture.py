"""``capture="direct"``: autograd accumulates into the task rows; same Gram and update as the hooks.

Property tests against the default capture (``capture="hooks"``, the exact reference path) on
the same micro-batches: captured gradients, diagnostics (the Gram's figures) and parameters after
several steps agree to float32 rounding, for every estimator and several methods, with untagged
backwards and tasks absent from a step. Then the refusals and the loud failures.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix import BalancedOptimizer, GradientMismatchError, NonFiniteGradientError
from balancedmix.direct import DirectCaptureError, DirectGradPlaceholder
from balancedmix.distributed import UnsupportedDistributedError
from dist_harness import run_ranks
from test_optimizer import TASKS, Net, batches, flat_grads


def pair(method="sum", estimator="raw", seed=0, opt=lambda p: torch.optim.SGD(p, lr=0.1), **kw):
    ref, net = Net(seed), Net(seed)
    hooks = BalancedOptimizer(opt([p for p in ref.parameters() if p.requires_grad]), method=method, estimator=estimator, **kw)
    direct = BalancedOptimizer(
        opt([p for p in net.parameters() if p.requires_grad]), method=method, estimator=estimator, capture="direct", **kw
    )
    return ref, hooks, net, direct


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or a == b


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    steps=st.integers(1, 3),
    micro=st.integers(1, 7),
    estimator=st.sampled_from(["raw", "split"]),
    method=st.sampled_from(["sum", "mean", "normalize", "pcgrad", "mgda"]),
    untagged=st.booleans(),
)
def test_direct_capture_matches_hooks(seed, steps, micro, estimator, method, untagged):
    # SGD: an update proportional to the gradient, so float32 rounding stays rounding (Adam would
    # turn a coefficient's 1e-9 residue on a parameter one task alone touches into a ±lr step)
    ref, hooks, net, direct = pair(method, estimator, seed, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    for s in range(steps):
        for task, x in batches(seed * 7 + s, micro):
            with hooks.task(task):
                ref.loss(task, x).backward()
            with direct.task(task):
                net.loss(task, x).backward()
        if untagged:
            x = torch.randn(2, 5, generator=torch.Generator().manual_seed(s))
            ref.loss("b", x, 0.3).backward()
            net.loss("b", x, 0.3).backward()
        want, got = hooks.captured_gradients(), direct.captured_gradients()
        assert set(want) == set(got)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=1e-5, atol=1e-6)  # params differ by rounding after step 1
        hooks.step()
        direct.step()
        dh, dd = hooks.diagnostics(), direct.diagnostics()
        assert set(dh) == set(dd)
        for key in dh:
            assert close(dd[key], dh[key]), (key, dd[key], dh[key])
        hooks.zero_grad()
        direct.zero_grad()
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_direct_sum_equals_plain_up_to_rounding_and_update_is_the_row_sum():
    """p.grad handed to the inner step is Σ_t G_t (rows summed), close to the plain accumulation."""
    plain, net = Net(3), Net(3)
    seen = {}

    class Record(torch.optim.SGD):
        def step(self, closure=None):
            seen["grad"] = flat_grads(net).clone()
            return super().step(closure)

    opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1)
    opt = BalancedOptimizer(Record([p for p in net.parameters() if p.requires_grad], lr=0.1), capture="direct")
    for task, x in batches(5, 6):
        plain.loss(task, x).backward()
        with opt.task(task):
            net.loss(task, x).backward()
    rows = opt.captured_gradients()
    opt_plain.step()
    opt.step()
    torch.testing.assert_close(seen["grad"], sum(rows.values()), rtol=0, atol=0)
    torch.testing.assert_close(seen["grad"], flat_grads(plain), rtol=1e-6, atol=1e-7)
    for p, q in zip(plain.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_p_grad_is_a_placeholder_between_backward_and_step():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), capture="direct")
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    g = model.trunk[0].weight.grad
    assert isinstance(g, DirectGradPlaceholder) and g.shape == model.trunk[0].weight.shape and g.dtype == torch.float32
    assert model.heads["b"].weight.grad is None  # no gradient: None, as without the wrapper
    with pytest.raises(DirectCaptureError, match="capture='direct'.*clipping"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(DirectCaptureError):
        g.mul_(2.0)
    opt.step()  # nothing was changed by the refused calls
    assert type(model.trunk[0].weight.grad) is torch.Tensor
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_model_zero_grad_mid_step_and_forgotten_zero_grad_are_caught():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), capture="direct")
    before = [p.detach().clone() for p in model.parameters()]
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    model.zero_grad()  # drops p.grad (the placeholders) mid-step: the plain optimizer would lose this gradient
    with opt.task("b"):
        model.loss("b", torch.randn(4, 5)).backward()
    with pytest.raises(GradientMismatchError, match="cleared or replaced"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.zero_grad()
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.step()  # forgot zero_grad(): p.grad holds the update of this step
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    with pytest.raises(GradientMismatchError, match="before this step's first backward"):
        opt.step()


def test_zero_grad_set_to_none_false_keeps_working():
    ref, hooks, net, direct = pair("mean")
    for s in range(3):
        for task, x in batches(s, 4):
            with hooks.task(task):
                ref.loss(task, x).backward()
            with direct.task(task):
                net.loss(task, x).backward()
        hooks.step()
        direct.step()
        hooks.zero_grad(set_to_none=False)
        net.zero_grad(set_to_none=False)  # the module's zeroing, as the HF Trainer may do
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using backward\(\) with create_graph=True")
def test_create_graph_backward_is_captured():
    ref, hooks, net, direct = pair("mean")
    for opt, model in ((hooks, ref), (direct, net)):
        for task, x in batches(1, 4):
            with opt.task(task):
                model.loss(task, x).backward(create_graph=True)
    want, got = hooks.captured_gradients(), direct.captured_gradients()
    for task in want:
        torch.testing.assert_close(got[task], want[task])
    hooks.step()
    direct.step()
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
    for m in (ref, net):  # break the create_graph reference cycles
        for p in m.parameters():
            p.grad = None


@pytest.mark.parametrize("policy", ["error", "skip_task", "skip_step"])
def test_nonfinite_policies_match_hooks(policy):
    ref, hooks, net, direct = pair("mean", nonfinite=policy)
    for opt, model in ((hooks, ref), (direct, net)):
        for task, x in batches(2, 5, tasks=["a", "b"]):
            with opt.task(task):
                model.loss(task, x).backward()
        with opt.task("c"):
            model.loss("c", torch.full((2, 5), float("nan"))).backward()
    before = [p.detach().clone() for p in net.parameters()]
    if policy == "error":
        with pytest.raises(NonFiniteGradientError):
            hooks.step()
        with pytest.raises(NonFiniteGradientError):
            direct.step()
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
        assert not any(isinstance(p.grad, DirectGradPlaceholder) for p in net.parameters())
        return
    hooks.step()
    direct.step()
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_direct_capture_refusals(monkeypatch):
    model = Net()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="capture must be"):
        BalancedOptimizer(torch.optim.SGD(params, lr=0.1), capture="rows")
    with pytest.raises(ValueError, match="capture='direct'.*sketch"):
        BalancedOptimizer(torch.optim.SGD(params, lr=0.1), capture="direct", sketch_dim=16)
    with pytest.raises(ValueError, match="capture='direct'.*measure"):
        BalancedOptimizer(torch.optim.SGD(params, lr=0.1), capture="direct", measure=list(model.trunk.parameters()))
    with pytest.raises(ValueError, match="capture='direct'.*LBFGS"):
        BalancedOptimizer(torch.optim.LBFGS(params), capture="direct")
    with pytest.raises(ValueError, match="capture='direct'.*bfloat16"):
        BalancedOptimizer(torch.optim.SGD(Net(dtype=torch.bfloat16).parameters(), lr=0.1), capture="direct")
    opt = BalancedOptimizer(torch.optim.SGD(params, lr=0.1), capture="direct")
    with pytest.raises(ValueError, match="capture='direct'.*GradScaler"):
        opt.set_grad_scaler(torch.amp.GradScaler("cpu"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate will hand the optimizer to DeepSpeed
    with pytest.raises(UnsupportedDistributedError, match="capture='direct' is single-process only.*deepspeed"):
        BalancedOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), tasks=TASKS, capture="direct")


def _ddp_direct_worker(rank: int, world: int) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net()
    DDP(model)
    try:
        BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, capture="direct")
    except UnsupportedDistributedError as exc:
        return str(exc)
    return "no error"


def test_direct_capture_is_refused_under_ddp():
    msgs = run_ranks(_ddp_direct_worker, 2, timeout=60.0)
    assert msgs[0] == msgs[1] and "single-process only (detected ddp)" in msgs[0]


def test_direct_state_dict_round_trip():
    model = Net(2)
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), method="normalize", capture="direct")
    for task, x in batches(0, 4):
        with opt.task(task):
            model.loss(task, x).backward()
    opt.step()
    opt.zero_grad()
    twin = Net(99)
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    opt2 = BalancedOptimizer(torch.optim.AdamW(twin.parameters(), lr=1e-2), method="normalize", capture="direct")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, m in ((opt, model), (opt2, twin)):
        for task, x in batches(1, 4):
            with o.task(task):
                m.loss(task, x).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_removing_or_replacing_a_direct_wrapper_leaves_no_placeholder():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), capture="direct")
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    opt.remove_hooks()
    assert not any(isinstance(p.grad, DirectGradPlaceholder) for p in model.parameters())
    model.zero_grad()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), capture="direct")
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward()
    hooks = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # replaces it mid-step
    assert not any(isinstance(p.grad, DirectGradPlaceholder) for p in model.parameters())
    model.zero_grad()
    with hooks.task("b"):
        model.loss("b", torch.randn(4, 5)).backward()
    hooks.step()
