"""Gradient capture edge cases (issue 14, items 5, 6, 7, 13): what the hooks capture and what not.

Only gradients that ``backward()`` accumulates into ``p.grad`` are task gradients: ``autograd.grad``
is not captured; ``create_graph=True`` and double backward work; a ``torch.amp.GradScaler`` loop
gives diagnostics in unscaled units and leaves no stale buffers after an overflow-skipped step;
non-leaf parameters (``differentiable=True`` optimizers) are refused at construction.
"""

import copy

import pytest
import torch

from balancedmix import BalancedOptimizer

TASKS = ["a", "b", "c"]


class Net(torch.nn.Module):
    """Shared trunk, one head per task."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in TASKS})

    def loss(self, task: str, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return (self.heads[task](self.trunk(x)).pow(2).mean() + 0.1 * self.trunk(x).sum()) * scale


def flat_grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def params_of(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def data(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(TASKS[i % 2], torch.randn(4, 5, generator=g)) for i in range(n)]


# ---------------------------------------------------------------- item 5: autograd.grad is not a task gradient
def test_autograd_grad_inside_a_task_block_is_not_captured():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    x = torch.randn(4, 5)
    with opt.task("a"):
        loss = model.loss("a", x)
        logged = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        loss.backward()
    cap = opt.captured_gradients()
    assert set(cap) == {"a"}
    torch.testing.assert_close(cap["a"], flat_grads(model), rtol=0, atol=0)
    flat_logged = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(logged, model.parameters())])
    torch.testing.assert_close(cap["a"], flat_logged)


def test_autograd_grad_outside_task_blocks_is_not_untagged():
    def run(log_gradients: bool):
        model = Net()
        opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
        for task, x in data(0):
            with opt.task(task):
                model.loss(task, x).backward()
            if log_gradients:  # a gradient norm logged outside the task block, as a user would
                torch.autograd.grad(model.loss(task, x), list(model.trunk.parameters()))
        assert "untagged" not in opt.captured_gradients()
        opt.step()
        return model, opt.diagnostics()

    model, d = run(True)
    ref, ref_d = run(False)
    assert "grad_norm/untagged" not in d
    assert d["grad_scale"] == pytest.approx(1.0)  # no fake 0.5 "uniform rescale"
    assert d == ref_d
    assert torch.equal(params_of(model), params_of(ref))


def test_backward_with_inputs_is_still_captured():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with opt.task("a"):
        model.loss("a", torch.randn(4, 5)).backward(inputs=list(model.trunk.parameters()))
    torch.testing.assert_close(opt.captured_gradients()["a"], flat_grads(model), rtol=0, atol=0)


def test_sum_stays_bit_identical_with_autograd_grad_in_the_loop():
    model, ref = Net(), Net()
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        for task, x in data(step):
            with opt.task(task):
                loss = model.loss(task, x)
                torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
                loss.backward()
            ref.loss(task, x).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert torch.equal(params_of(model), params_of(ref))


# ---------------------------------------------------------------- item 6: create_graph=True and double backward
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward_and_gradient_penalty():
    model, ref = Net(), Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m, wrapped in ((model, True), (ref, False)):
        for task, x in data(1):
            ctx = opt.task(task) if wrapped else _null()
            with ctx:
                loss = m.loss(task, x)
                loss.backward(create_graph=True)
                # gradient penalty on the accumulated gradient (double backward)
                penalty = sum(p.grad.pow(2).sum() for p in m.trunk.parameters())
                penalty.backward()
            for p in m.parameters():  # break the graph between micro-batches (and the reference cycle)
                if p.grad is not None:
                    p.grad = p.grad.detach()
    torch.testing.assert_close(flat_grads(model), flat_grads(ref), rtol=0, atol=0)
    cap = opt.captured_gradients()
    assert not any(t.requires_grad for t in cap.values())
    torch.testing.assert_close(cap["a"] + cap["b"], flat_grads(model))
    opt.step()
    ref_opt.step()
    assert torch.equal(params_of(model), params_of(ref))


def test_gradnorm_style_double_backward_through_autograd_grad():
    """GradNorm-style: a loss built from ``autograd.grad(..., create_graph=True)``, then backward."""
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="mean")
    ref = copy.deepcopy(model)
    x = torch.randn(4, 5)
    shared = list(model.trunk[2].parameters())
    with opt.task("a"):
        loss = model.loss("a", x)
        g = torch.autograd.grad(loss, shared, create_graph=True)
        gn_loss = loss + sum(t.norm() for t in g)
        gn_loss.backward()
    r_loss = ref.loss("a", x)
    r_g = torch.autograd.grad(r_loss, list(ref.trunk[2].parameters()), create_graph=True)
    (r_loss + sum(t.norm() for t in r_g)).backward()
    torch.testing.assert_close(opt.captured_gradients()["a"], flat_grads(ref))
    opt.step()
    assert opt.diagnostics()["grad_scale"] == pytest.approx(1.0)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- item 7: torch.amp.GradScaler
def _amp_run(method, steps, scaler_scale=None, clip=None, zero="opt", overflow_at=(), attach=True, plain=False, unscale=True, **options):
    """Run ``steps`` steps of two micro-batches; returns (model, list of diagnostics per step).

    ``scaler_scale``: None = no GradScaler, else its init_scale. ``overflow_at``: steps whose
    first micro-batch loss is multiplied by inf (the scaler skips those steps).
    ``plain``: the bare AdamW instead of the wrapper (reference).
    """
    model = Net()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = inner if plain else BalancedOptimizer(inner, method=method, **options)
    scaler = None
    if scaler_scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale, growth_interval=1)
        if attach and not plain:
            opt.set_grad_scaler(scaler)
    diags = []
    for step in range(steps):
        for i, (task, x) in enumerate(data(100 + step)):
            loss = model.loss(task, x, scale=float("inf") if (step in overflow_at and i == 0) else 1.0)
            ctx = _null() if plain else opt.task(task)
            with ctx:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None and unscale:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if zero == "opt":
            opt.zero_grad()
        elif zero == "model":
            model.zero_grad()
        elif zero == "model_inplace":
            model.zero_grad(set_to_none=False)
        diags.append({} if plain else opt.diagnostics())
    return model, diags


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_scaler_diagnostics_and_correction_are_in_unscaled_units(clip):
    ref, ref_d = _amp_run("normalize", 3, clip=clip, target=1.0)
    amp, amp_d = _amp_run("normalize", 3, scaler_scale=1024.0, clip=clip, target=1.0)
    for r, a in zip(ref_d, amp_d):
        for key in ("grad_norm/a", "grad_norm/b", "grad_norm/total", "grad_norm/update", "grad_scale", "update_share/a"):
            assert a[key] == pytest.approx(r[key], rel=1e-5), key
        assert a["loss_scale"] >= 1024.0
    torch.testing.assert_close(params_of(amp), params_of(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero", ["opt", "model", "model_inplace"])
def test_grad_scaler_overflow_step_leaves_no_stale_buffers(zero):
    # step 1 overflows: the scaler skips it; whatever zero_grad the loop uses, step 2 must be clean
    amp, amp_d = _amp_run("mean", 3, scaler_scale=1024.0, zero=zero, overflow_at=(1,))
    ref, ref_d = _amp_run("mean", 3, scaler_scale=1024.0, zero="opt", overflow_at=(1,))
    assert torch.equal(params_of(amp), params_of(ref))
    assert amp_d[2]["grad_norm/a"] == pytest.approx(ref_d[2]["grad_norm/a"])
    assert amp_d[2]["num_microbatches/a"] == 2.0  # only step 2's micro-batches


def test_grad_scaler_sum_is_bit_identical_to_plain_loop_with_overflow():
    for zero in ("opt", "model"):
        plain, _ = _amp_run("sum", 4, scaler_scale=2.0**16, clip=1.0, zero=zero, overflow_at=(1,), plain=True)
        amp, _ = _amp_run("sum", 4, scaler_scale=2.0**16, clip=1.0, zero=zero, overflow_at=(1,))
        assert torch.equal(params_of(amp), params_of(plain))


def test_captured_gradients_are_unscaled_with_a_grad_scaler():
    model = Net()
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt.set_grad_scaler(scaler)
    assert opt.grad_scaler is scaler
    with opt.task("a"):
        scaler.scale(model.loss("a", torch.randn(4, 5))).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(opt.captured_gradients()["a"], flat_grads(model))
    with pytest.raises(TypeError, match="GradScaler"):
        opt.set_grad_scaler(object())


# ---------------------------------------------------------------- item 13: non-leaf parameters
def test_differentiable_optimizer_over_non_leaf_tensors_is_refused_at_construction():
    base = torch.randn(4, 3, requires_grad=True)
    weight = base * 1.0  # a non-leaf "parameter", as in meta-learning with differentiable=True
    inner = torch.optim.SGD([weight], lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        BalancedOptimizer(inner)
    # nothing left behind: no hook on the tensor, the inner optimizer untouched
    assert not weight._backward_hooks
    assert inner.state == {} and inner.param_groups[0]["params"] == [weight]


@pytest.mark.parametrize("zero", ["opt", "model", "model_inplace"])
def test_grad_scaler_without_set_grad_scaler_works_when_step_unscales(zero):
    """No ``set_grad_scaler``, no ``scaler.unscale_``: GradScaler.step hands the scale over."""
    ref, ref_d = _amp_run("normalize", 3, zero=zero, target=1.0)
    amp, amp_d = _amp_run("normalize", 3, scaler_scale=1024.0, zero=zero, attach=False, unscale=False, target=1.0)
    for r, a in zip(ref_d, amp_d):
        assert a["grad_norm/a"] == pytest.approx(r["grad_norm/a"], rel=1e-5)
        assert a["grad_scale"] == pytest.approx(1.0)
    torch.testing.assert_close(params_of(amp), params_of(ref), rtol=1e-5, atol=1e-6)
    # an overflow step is skipped and leaves nothing behind
    amp, amp_d = _amp_run("mean", 3, scaler_scale=1024.0, zero=zero, overflow_at=(1,), attach=False, unscale=False)
    assert amp_d[1]["amp_skipped"] == 1.0
    assert amp_d[2]["num_microbatches/a"] == 2.0
    plain, _ = _amp_run("sum", 3, scaler_scale=1024.0, zero=zero, overflow_at=(1,), plain=True, unscale=False)
    amp, _ = _amp_run("sum", 3, scaler_scale=1024.0, zero=zero, overflow_at=(1,), attach=False, unscale=False)
    assert torch.equal(params_of(amp), params_of(plain))


def test_grad_scaler_unscale_without_set_grad_scaler_is_refused_clearly():
    model = Net()
    opt = BalancedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), method="normalize")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = params_of(model).clone()
    with opt.task("a"):
        scaler.scale(model.loss("a", torch.randn(4, 5))).backward()
    scaler.unscale_(opt)
    unscaled_norm = float(flat_grads(model).norm())
    with pytest.raises(RuntimeError, match="set_grad_scaler"):
        scaler.step(opt)
    assert torch.equal(params_of(model), before)
    assert opt.optimizer.state == {}
    # nothing lost: attach the scaler and step again
    opt.set_grad_scaler(scaler)
    scaler.step(opt)
    assert not torch.equal(params_of(model), before)
    assert opt.diagnostics()["grad_norm/a"] == pytest.approx(opt.diagnostics()["grad_norm/total"])
    assert opt.diagnostics()["grad_norm/total"] == pytest.approx(unscaled_norm, rel=1e-6)


# ---------------------------------------------------------------- item 7 under DDP (2 gloo processes)
def _ddp_amp_worker(rank: int, world: int, method: str, mode: str, attach: bool, clip: float | None) -> dict:
    from test_distributed import M, SCHEDULE, STEPS, TASKS as DTASKS, _null as dnull, batch, loss_fn, make_model
    from test_distributed import params_of as dparams
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=DTASKS, method=method)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    if attach:
        opt.set_grad_scaler(scaler)
    diags = []
    for step in range(STEPS):
        for i, task in enumerate(SCHEDULE[rank]):
            sync_now = mode == "ddp" and i == M - 1
            with (dnull() if sync_now else ddp.no_sync()), opt.task(task):
                scaler.scale(loss_fn(ddp, batch(step, rank, i, task)) / M).backward()
        if clip is not None:
            opt.synchronize()  # global gradients before the scaler and the clip (no_sync micro-steps)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": dparams(model)}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "buffers"])
@pytest.mark.parametrize("attach, clip", [(True, 0.05), (False, None)])
def test_grad_scaler_under_ddp_matches_single_process_without_amp(mode, attach, clip):
    from dist_harness import run_ranks
    from test_distributed import TIMEOUT, assert_diag_equal, assert_params_equal, reference

    want_diags, want_params = reference("normalize", clip=clip)
    results = run_ranks(_ddp_amp_worker, 2, "normalize", mode, attach, clip, timeout=TIMEOUT)
    for res in results:
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
            assert got["loss_scale"] == 1024.0
        assert_params_equal(res["params"], want_params)


def test_balanced_grpo_trainer_attaches_the_accelerators_grad_scaler(tmp_path):
    pytest.importorskip("trl")
    import test_trl

    trainer = test_trl.make_trainer(test_trl.BalancedGRPOTrainer, test_trl.build_char_tokenizer(), tmp_path)
    scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.scaler = scaler  # what Accelerator(mixed_precision="fp16") holds on a GPU
    opt = trainer.create_optimizer()
    assert opt.grad_scaler is scaler


def test_non_leaf_tensor_with_retain_grad_is_refused_at_construction():
    base = torch.randn(4, 3, requires_grad=True)
    weight = base * 2.0
    weight.retain_grad()  # torch.optim accepts it without differentiable=True
    leaf = torch.nn.Parameter(torch.randn(3))
    inner = torch.optim.SGD([leaf, weight], lr=0.1)
    with pytest.raises(ValueError, match="parameter 1 .*not a leaf"):
        BalancedOptimizer(inner)
    assert not leaf._backward_hooks and not leaf._post_accumulate_grad_hooks  # nothing hooked before refusing


def test_add_param_group_with_a_non_leaf_tensor_leaves_the_inner_optimizer_unchanged():
    leaf = torch.nn.Parameter(torch.randn(3))
    opt = BalancedOptimizer(torch.optim.SGD([leaf], lr=0.1))
    weight = torch.randn(4, 3, requires_grad=True) * 2.0
    weight.retain_grad()
    with pytest.raises(ValueError, match="not a leaf"):
        opt.add_param_group({"params": [weight]})
    assert len(opt.optimizer.param_groups) == 1  # refused before the inner optimizer took the group


def _ddp_bucket_view_worker(rank: int, world: int, mode: str) -> dict:
    from test_distributed import M, SCHEDULE, STEPS, TASKS as DTASKS, _null as dnull, batch, loss_fn, make_model
    from test_distributed import params_of as dparams
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model, gradient_as_bucket_view=True)  # p.grad becomes a view into DDP's bucket
    opt = BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tasks=DTASKS, method="normalize")
    diags = []
    for step in range(STEPS):
        for i, task in enumerate(SCHEDULE[rank]):
            sync_now = mode == "ddp" and i == M - 1
            with (dnull() if sync_now else ddp.no_sync()), opt.task(task):
                (loss_fn(ddp, batch(step, rank, i, task)) / M).backward()
        opt.step()
        opt.zero_grad(set_to_none=step % 2 == 0)
        diags.append(opt.diagnostics())
    return {"diags": diags, "params": dparams(model)}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "buffers"])
def test_capture_reads_the_local_gradient_with_ddp_bucket_views(mode):
    """The post-accumulate hook runs before DDP's reducer hook: the captured gradient is local."""
    from dist_harness import run_ranks
    from test_distributed import TIMEOUT, assert_diag_equal, assert_params_equal, reference

    want_diags, want_params = reference("normalize")
    for res in run_ranks(_ddp_bucket_view_worker, 2, mode, timeout=TIMEOUT):
        for got, want in zip(res["diags"], want_diags):
            assert_diag_equal(got, want)
        assert_params_equal(res["params"], want_params)
