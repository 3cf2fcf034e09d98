"""CountSketch (balancedmix.sketch) and the two gradient storages (balancedmix.storage)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedmix import stats
from balancedmix.sketch import (
    CountSketch,
    _fmix32,
    _fmix32_range,
    _hash_reference,
    _hash_reference_full,
    delta_standard_errors,
    exact_inner_product_variance,
    gram_covariance,
    global_starts,
    inner_product_variance,
    mix64,
    tau_stride,
)
from balancedmix.storage import ExactStorage, SketchStorage

# ----------------------------------------------------------------------------- helpers


def sketches_over_keys(vectors: torch.Tensor, dim: int, n_keys: int, first: int = 0, start: int = 0) -> torch.Tensor:
    """``[n_keys, V, d]``: the sketch of each row of ``vectors`` ``[V, n]`` (at coordinate ``start``) under keys ``first..``."""
    cs = CountSketch(dim)
    n = vectors.shape[1]
    out = torch.zeros(n_keys, vectors.shape[0], dim, dtype=torch.float64)
    for i in range(n_keys):
        h, s = cs.buckets_and_signs(start, n, cs.key(first + i))
        out[i].index_add_(1, h, vectors.to(torch.float64) * s)
    return out


# ----------------------------------------------------------------------------- the hash


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**18), st.integers(1, 200), st.integers(0, 2**64 - 1), st.sampled_from([1, 2, 5, 16, 1 << 20]))
def test_buckets_and_signs_match_the_pure_python_definition(block, n, key, dim):
    start = block * dim + (block * 7919) % dim
    h, s = CountSketch(dim).buckets_and_signs(start, n, key)
    for k in (0, n // 2, n - 1):
        assert (int(h[k]), int(s[k])) == _hash_reference(start + k, key, dim)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3000))
def test_vectorised_fmix32_matches_the_reference(subkey, n):
    z = _fmix32_range(n, subkey)
    for i in (0, n // 3, n - 1):
        assert int(z[i]) == _fmix32(i ^ subkey)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 300), st.sampled_from([1, 3, 8, 64]), st.integers(1, 200),
       st.sampled_from([torch.float64, torch.float32]))
def test_loop_and_vectorised_paths_are_the_explicit_matrix(block, n, dim, chunk, dtype):
    """Both ways of adding (two addcmul_ per block on the CPU; batched gathers on accelerators),
    for ranges that start and end anywhere in a block, equal the matrix built from h and s."""
    start = block * dim + block % dim
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n + dim))
    key = mix64(start, n)
    h, s = CountSketch(dim).buckets_and_signs(start, n, key)
    want = torch.zeros(dim, dtype=torch.float64).index_add_(0, h, s * x)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for vec in (False, True):
        got = CountSketch(dim, chunk=chunk, vectorised=vec).add_(torch.zeros(dim, dtype=dtype), x.to(dtype), start, key)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_a_block_is_a_signed_rotation_so_one_block_is_sketched_exactly():
    """Inside a block the buckets are a rotation (no collisions): P <= d sketches without error."""
    cs = CountSketch(64)
    key = cs.key(0)
    h, s = cs.buckets_and_signs(64 * 7, 64, key)
    assert sorted(h.tolist()) == list(range(64)) and set(s.tolist()) <= {-1.0, 1.0}
    assert torch.equal(torch.remainder(h - h[0], 64), torch.arange(64))
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert math.isclose(float(cs.sketch(a, key=key) @ cs.sketch(b, key=key)), float(a @ b), rel_tol=1e-12)


def _tau_conflicts(dim: int, blocks: int, keys: int) -> int:
    """How often the proof's conditions on ``τ`` fail over ``keys`` keys: a colliding pair of
    coordinates (different blocks, same bucket) reading one ``τ`` entry, or two colliding pairs of
    the same two blocks reading the same two entries."""
    cs = CountSketch(dim)
    n = blocks * dim
    bad = 0
    for i in range(keys):
        key = cs.key(i)
        h, _ = cs.buckets_and_signs(0, n, key)
        draws = cs.draws(key, blocks)
        j = torch.arange(n)
        t = (j % dim + draws.rot[j // dim]) + draws.stride * (j // dim)  # the τ entry each coordinate reads
        seen: set[tuple[int, int, int, int]] = set()
        for a in range(n):
            for b in range(a + 1, n):
                if a // dim == b // dim or int(h[a]) != int(h[b]):
                    continue
                ta, tb = int(t[a]), int(t[b])
                pair = (a // dim, b // dim, min(ta, tb), max(ta, tb))
                bad += ta == tb or pair in seen
                seen.add(pair)
    return bad


@pytest.mark.parametrize("dim", [1, 2, 4, 6, 8, 12])
def test_colliding_pairs_never_share_tau_entries(dim):
    """The conditions the exact variance rests on (docs/diagnostics.md), checked exhaustively on
    4 blocks under 40 keys, for powers of two and for d divisible by 2, 3 and 4 (m = 3, 4, 5)."""
    m = tau_stride(dim)
    assert m >= 2 and dim % m != 0 and all(dim % k == 0 for k in range(2, m))
    assert _tau_conflicts(dim, 4, 40) == 0
    for j in (0, dim - 1, 3 * dim + 1):
        h, s, t = _hash_reference_full(j, 12345, dim)
        assert (h, s) == _hash_reference(j, 12345, dim) and 0 <= h < dim and t < 2 * dim + m * 4


def test_a_tau_stride_dividing_d_breaks_the_conditions(monkeypatch):
    """Negative control: with m | d (here m = 2, d = 8) the check above does find shared entries."""
    import balancedmix.sketch as sketch_module

    monkeypatch.setattr(sketch_module, "tau_stride", lambda dim: 2)
    assert _tau_conflicts(8, 4, 40) > 0


def test_accumulate_then_one_fold_equals_adding_each_range():
    cs = CountSketch(16, seed=4)
    key = cs.key(2)
    xs = [torch.randn(n, dtype=torch.float64) for n in (5, 40, 16, 3)]
    starts = [0, 5, 45, 61]
    each = torch.zeros(16, dtype=torch.float64)
    scratch = torch.zeros(32, dtype=torch.float64)
    for x, s0 in zip(xs, starts):
        cs.add_(each, x, s0, key)
        cs.accumulate_(scratch, x, s0, key, scale=0.5)
    once = cs.fold_(torch.zeros(16, dtype=torch.float64), scratch)
    torch.testing.assert_close(once, 0.5 * each)
    assert float(scratch.abs().sum()) == 0.0  # the fold leaves the scratch zeroed
    torch.testing.assert_close(each, cs.sketch(torch.cat(xs), key=key))
    with pytest.raises(ValueError, match="scratch must have shape"):
        cs.accumulate_(torch.zeros(16), xs[0], 0, key)


def test_keys_differ_by_seed_and_step():
    assert len({mix64(s, t) for s in range(5) for t in range(5)}) == 25
    cs = CountSketch(64, seed=3)
    assert cs.key(0) != cs.key(1) and CountSketch(64, seed=3).key(7) == cs.key(7)


def test_buckets_are_uniform_and_signs_balanced():
    cs = CountSketch(16)
    h, s = cs.buckets_and_signs(0, 160_000, cs.key(0))
    counts = torch.bincount(h, minlength=16).double()
    # chi-square with 15 degrees of freedom: P(χ² > 50) < 1e-5
    assert float(((counts - 10_000) ** 2 / 10_000).sum()) < 50
    assert abs(float(s.mean())) < 5 / math.sqrt(160_000)


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, 2**31])
def test_bad_dimension_is_rejected(dim):
    with pytest.raises(ValueError, match="sketch dimension"):
        CountSketch(dim)


# ----------------------------------------------------------------------------- linearity


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 400),
    st.lists(st.floats(0.0, 1.0), min_size=0, max_size=6),
    st.integers(1, 50),
    st.sampled_from([1, 7, 12, 64]),
    st.integers(0, 2**18),
)
def test_sum_of_sketches_of_disjoint_pieces_is_the_sketch_of_the_whole(n, cuts, chunk, dim, offset):
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    whole_cs = CountSketch(dim, seed=1)
    key = whole_cs.key(5)
    whole = whole_cs.sketch(x, start=offset, key=key)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    pieces_cs = CountSketch(dim, seed=1, chunk=chunk)  # chunking is a detail of the computation
    total = torch.zeros(dim, dtype=torch.float64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pieces_cs.add_(total, x[lo:hi], offset + lo, key)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


def test_sketch_is_the_matrix_product_and_linear_in_the_values():
    cs = CountSketch(8, seed=2)
    key = cs.key(0)
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    mat = cs.matrix(50, key)
    torch.testing.assert_close(cs.sketch(a, key=key), mat @ a)
    torch.testing.assert_close(cs.sketch(2 * a - 3 * b, key=key), 2 * cs.sketch(a, key=key) - 3 * cs.sketch(b, key=key))
    assert set(mat.abs().sum(0).tolist()) == {1.0}  # one ±1 per column


def test_a_matrix_parameter_is_sketched_by_its_row_major_coordinates():
    cs = CountSketch(32, seed=0)
    key = cs.key(0)
    w = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(cs.sketch(w.t(), key=key), cs.sketch(w.t().contiguous().reshape(-1), key=key))
    # row split (an FSDP2 Shard(0) shard holds rows row0.. at coordinate row0 * row_numel)
    top = cs.sketch(w[:2], start=0, key=key)
    rest = cs.sketch(w[2:], start=2 * 5, key=key)
    torch.testing.assert_close(top + rest, cs.sketch(w, key=key))


def test_global_starts_of_plain_parameters_are_cumulative_sizes():
    assert global_starts([torch.zeros(3, 4), torch.zeros(5), torch.zeros(())]) == [0, 12, 17]


# ----------------------------------------------------------------------------- moments over seeds


def test_pairwise_collision_moments():
    """Two coordinates of one block never collide; of different blocks: P(h_i = h_j) = 1/d and
    E[s_i s_j 1{h_i=h_j}] = 0; and the products of two colliding pairs average 0 — also for two
    pairs from the same two blocks (the τ window differs per block: this is what keeps the
    CountSketch variance)."""
    dim, n, keys = 8, 24, 6000
    cs = CountSketch(dim)
    coll = torch.zeros(keys, n, n, dtype=torch.float64)
    signed = torch.zeros(keys, n, n, dtype=torch.float64)
    for i in range(keys):
        h, s = cs.buckets_and_signs(0, n, cs.key(i))
        eq = (h[:, None] == h[None, :]).double()
        coll[i] = eq
        signed[i] = eq * s[:, None] * s[None, :]
    block = torch.arange(n) // dim
    same = (block[:, None] == block[None, :]) & ~torch.eye(n, dtype=torch.bool)
    diff = block[:, None] != block[None, :]
    assert float(coll[:, same].abs().max()) == 0.0
    p = 1.0 / dim
    se_p = math.sqrt(p * (1 - p) / keys)
    assert float((coll.mean(0)[diff] - p).abs().max()) < 5 * se_p
    se_x = math.sqrt(p / keys)
    assert float(signed.mean(0)[diff].abs().max()) < 5 * se_x
    # four distinct coordinates: blocks (0,1) and (0,2), and two pairs across the same blocks (0,1)
    for (i, j), (k, l) in (((0, 9), (2, 17)), ((0, 9), (3, 12)), ((1, 8), (5, 13))):
        four = signed[:, i, j] * signed[:, k, l]
        assert abs(float(four.mean())) < 6 * math.sqrt(p * p / keys), ((i, j), (k, l))


@settings(max_examples=8, deadline=None)
@given(st.integers(20, 120), st.sampled_from([4, 6, 16]), st.floats(-0.9, 0.9), st.integers(0, 10_000),
       st.sampled_from(["random", "constant", "ramp"]))
def test_inner_products_unbiased_with_the_stated_variance_over_seeds(n, dim, rho, seed, shape):
    """Over 3000 keys: mean of ⟨Sa,Sb⟩ within 5 SE of ⟨a,b⟩; variance within 20 % of the formula
    (which leaves out the pairs inside a block) and never above the fully random CountSketch's.
    "constant" vectors are the case where a rotation alone, without the per-block τ window,
    would double the variance (every collision of two blocks would add the same sign)."""
    g = torch.Generator().manual_seed(seed)
    if shape == "random":
        a = torch.randn(n, dtype=torch.float64, generator=g)
    elif shape == "constant":
        a = torch.ones(n, dtype=torch.float64)
    else:
        a = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    b = rho * a + math.sqrt(1 - rho * rho) * torch.randn(n, dtype=torch.float64, generator=g).abs()
    b[: n // 4] *= 3.0  # uneven coordinates: the fourth-moment term matters
    keys = 3000
    start = 8 * dim + 1  # not aligned to a block
    sk = sketches_over_keys(torch.stack([a, b]), dim, keys, first=seed, start=start)
    est = (sk[:, 0] * sk[:, 1]).sum(-1)
    var = exact_inner_product_variance(a, b, dim, start)
    full = inner_product_variance(float(a @ a), float(b @ b), float(a @ b), dim, float((a * a * b * b).sum()))
    assert var <= full * (1 + 1e-12)
    assert abs(float(est.mean()) - float(a @ b)) < 5 * math.sqrt(var / keys)
    emp = float(est.var())
    assert abs(emp / var - 1.0) < 0.2, (emp, var)


def test_exact_variance_is_zero_inside_one_block_and_the_countsketch_one_across_many():
    a, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    assert exact_inner_product_variance(a, b, 64, 64 * 3) == 0.0
    assert exact_inner_product_variance(a, b, 64, 64 * 3 + 1) > 0.0  # straddles two blocks
    # one coordinate per block: every pair is across blocks, the fully random CountSketch's variance
    full = inner_product_variance(float(a @ a), float(b @ b), float(a @ b), 1, float((a * a * b * b).sum()))
    assert math.isclose(exact_inner_product_variance(a, b, 1), full, rel_tol=1e-12)


def test_squared_norm_relative_error_is_sqrt_2_over_d_for_spread_vectors():
    dim = 256
    a = torch.randn(20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cs = CountSketch(dim)
    est = torch.tensor([float(cs.sketch(a, key=cs.key(k)).square().sum()) for k in range(400)])
    rel = est / float(a @ a) - 1.0
    assert abs(float(rel.std()) / math.sqrt(2 / dim) - 1.0) < 0.15
    assert abs(float(rel.mean())) < 5 * math.sqrt(2 / dim / 400)


# ----------------------------------------------------------------------------- standard errors


def test_delta_method_reproduces_the_closed_form_variances():
    gram = torch.tensor([[4.0, 1.0, -0.5], [1.0, 2.0, 0.3], [-0.5, 0.3, 1.0]], dtype=torch.float64)
    d = 100
    cov = gram_covariance(gram, d)
    # Var Ĝ_01 = (G00 G11 + G01²)/d; Var Ĝ_00 = 2 G00²/d
    assert math.isclose(float(cov[0, 1, 0, 1]), (4 * 2 + 1) / d)
    assert math.isclose(float(cov[0, 0, 0, 0]), 2 * 16 / d)
    se = delta_standard_errors(lambda g: torch.stack([g[0, 1], g[0, 0]]), gram, d)
    torch.testing.assert_close(se, torch.tensor([math.sqrt(9 / d), math.sqrt(32 / d)], dtype=torch.float64))
    # a general function: the contracted form equals J Cov Jᵀ with the explicit covariance
    fn = lambda g: stats.cosines(g)[0, 1:]  # noqa: E731
    jac = torch.autograd.functional.jacobian(lambda x: fn(x).reshape(-1), gram).reshape(2, -1)
    full = jac @ cov.reshape(9, 9) @ jac.T
    torch.testing.assert_close(delta_standard_errors(fn, gram, d), full.diagonal().sqrt())


def test_a_zero_task_gradient_gets_zero_standard_errors_and_leaves_the_others_finite():
    gram = torch.tensor([[0.0, 0, 0], [0, 4, 1], [0, 1, 2]], dtype=torch.float64)

    def fn(g):
        cos = stats.cosines(g)
        return torch.cat([stats.norms(g), stats.update_shares(g), torch.stack([cos[0, 1], cos[1, 2]])])

    se = delta_standard_errors(fn, gram, 100)
    assert torch.isfinite(se).all()
    # through a grouping of rows (a matrix product, as the optimizer sums split halves) too
    agg = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(delta_standard_errors(lambda g: fn(agg @ g @ agg.T), gram, 100), se)
    assert se[0] == 0 and se[3] < 1e-20 and se[6] < 1e-20  # the zero task's norm, share and cosine
    # task 1's norm: SE(‖a‖) = SE(‖a‖²) / (2‖a‖) = sqrt(2/d) ‖a‖ / 2
    assert float(se[1]) == pytest.approx(math.sqrt(2 / 100) * 2 / 2)


def test_predicted_standard_errors_of_norms_cosines_and_shares_match_monte_carlo():
    g = torch.Generator().manual_seed(4)
    n, dim, keys = 3000, 64, 600
    base = torch.randn(n, dtype=torch.float64, generator=g)
    vecs = torch.stack([3 * base + torch.randn(n, dtype=torch.float64, generator=g),
                        base + torch.randn(n, dtype=torch.float64, generator=g),
                        0.5 * torch.randn(n, dtype=torch.float64, generator=g)])
    gram = vecs @ vecs.T

    def figures(gm: torch.Tensor) -> torch.Tensor:
        return torch.cat([stats.norms(gm), stats.cosines(gm)[0, 1:2], stats.update_shares(gm)])

    se = delta_standard_errors(figures, gram, dim)
    sk = sketches_over_keys(vecs, dim, keys)
    vals = torch.stack([figures(s @ s.T) for s in sk])
    emp = vals.std(0)
    ratio = emp / se
    assert torch.all((ratio > 0.8) & (ratio < 1.25)), ratio
    # and the estimates are centred on the exact figures (bias O(1/d) ≪ SE for these)
    assert torch.all((vals.mean(0) - figures(gram)).abs() < 5 * se / math.sqrt(keys) + 0.05 * se)


# ----------------------------------------------------------------------------- storages


def _params():
    return [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]


def test_sketch_storage_rows_are_sketches_of_the_row_gradients_and_memory_is_rows_times_d():
    """Rows first used in the order 1, 0, 2 (each allocation moves the pending row of the scratch:
    it must be folded into the right row first); memory is rows × d plus the 2d scratch."""
    params = _params()
    store = SketchStorage(params, dim=16, seed=3, dtype=torch.float64, order=lambda k: k)
    g = torch.Generator().manual_seed(0)
    grads = {k: [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params] for k in (1, 0, 2)}
    for k, gs in grads.items():
        r = store.row(k)
        for i, gr in enumerate(gs):
            store.add(r, i, gr)
        assert store.hook_scale(r) == 1.0  # no coefficient yet: autograd gets grad unchanged
    assert store.keys == [0, 1, 2] and store.finish() == [0, 1, 2]
    assert store.nbytes == (3 + 2) * 16 * 8 and tuple(store.data.shape) == (3, 16)
    mat = store.sketcher.matrix(17, store.key)
    flat = {k: torch.cat([t.reshape(-1) for t in gs]) for k, gs in grads.items()}
    for k in (0, 1, 2):
        torch.testing.assert_close(store.data[store.index(k)], mat @ flat[k])
    total = [sum(grads[k][i] for k in grads) for i in range(2)]
    row_gram, dots, sq = store.row_stats(total)
    sk = torch.stack([mat @ flat[k] for k in (0, 1, 2)])
    torch.testing.assert_close(row_gram, sk @ sk.T)
    torch.testing.assert_close(dots, sk @ sk.sum(0))
    torch.testing.assert_close(sq, sk.sum(0) @ sk.sum(0))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.booleans()), min_size=1, max_size=25))
def test_sketch_storage_rows_stay_exact_under_any_interleaving_of_adds_and_reads(ops):
    """Adds to rows in any order (the scratch holds one row at a time), with reads of ``data``,
    ``row_stats`` and new rows in between: every row is the sketch of what was added to it."""
    params = _params()
    store = SketchStorage(params, dim=8, seed=1, dtype=torch.float64, order=lambda k: k)
    mat = store.sketcher.matrix(17, store.key)
    want: dict[int, torch.Tensor] = {}
    for n, (key, index, read) in enumerate(ops):
        grad = torch.full(params[index].shape, float(n + 1), dtype=torch.float64)
        store.add(store.row(key), index, grad)
        flat = torch.zeros(17, dtype=torch.float64)
        lo = 0 if index == 0 else 12
        flat[lo : lo + grad.numel()] = grad.reshape(-1)
        want[key] = want.get(key, torch.zeros(8, dtype=torch.float64)) + mat @ flat
        if read:
            store.row_stats([torch.ones(4, 3, dtype=torch.float64), None])
    for key, sketch in want.items():
        torch.testing.assert_close(store.data[store.index(key)], sketch)


def test_sketch_storage_takes_other_dtypes_and_layouts_off_its_fast_path():
    """The hooks' fast path (a cached plan, contiguous gradients of the storage's dtype) and the
    general path (a bf16 gradient, a transposed one) give the same row."""
    params = [torch.zeros(6, 5), torch.zeros(7)]
    fast = SketchStorage(params, dim=8, seed=2)
    slow = SketchStorage(params, dim=8, seed=2)
    w = torch.randn(5, 6).t()  # non-contiguous
    b = torch.randn(7).to(torch.bfloat16)
    for store, grads in ((fast, [w.contiguous(), b.float()]), (slow, [w, b])):
        r = store.row("t")
        for i, g in enumerate(grads):
            store.add(r, i, g)
    torch.testing.assert_close(fast.data, slow.data)
    mat = fast.sketcher.matrix(37, fast.key)
    flat = torch.cat([w.reshape(-1), b.float()]).double()
    torch.testing.assert_close(fast.data[0].double(), mat @ flat, rtol=1e-5, atol=1e-5)


def test_sketch_storage_split_rows_cost_two_k_times_d_plus_the_scratch():
    params = [torch.zeros(1000)]
    store = SketchStorage(params, dim=64)
    store.reserve([("task", t, h) for t in range(4) for h in (0, 1)])
    assert store.nbytes == (2 * 4 + 2) * 64 * 4  # 2K rows and the 2d scratch
    big = [v for v in vars(store).values() if isinstance(v, torch.Tensor) and v.numel() >= 1000]
    assert big == []  # nothing of size P is kept


def test_sketch_storage_applies_lagged_coefficients_in_the_hook_and_keeps_absent_ones():
    params = [torch.zeros(6, dtype=torch.float64)]
    store = SketchStorage(params, dim=8, dtype=torch.float64, order=lambda k: k)
    a, b = store.row("a"), store.row("b")
    ga = torch.arange(6.0, dtype=torch.float64)
    store.add(a, 0, ga)
    store.add(b, 0, ga)
    assert store.hook_scale(a) == store.hook_scale(b) == store.hook_scale(None) == 1.0
    torch.testing.assert_close(store.applied(), torch.ones(2, dtype=torch.float64))
    applied = store.combine(torch.tensor([0.5, 2.0]), 1.0, [None])
    torch.testing.assert_close(applied, torch.ones(2, dtype=torch.float64))  # this step: the previous ones
    store.reset()
    assert store.hook_scale(a) == 0.5 and store.hook_scale(b) == 2.0  # next step: the hook scales
    store.add(a, 0, ga)
    torch.testing.assert_close(store.applied(), torch.tensor([0.5, 2.0], dtype=torch.float64))
    store.combine(torch.tensor([0.25, 7.0]), 1.0, [None])  # only "a" was used: "b" keeps 2.0
    store.reset()
    torch.testing.assert_close(store.applied(), torch.tensor([0.25, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot rebuild"):
        store.combine(torch.ones(2), 1.0, [None], rebuild=True)


def test_sketch_storage_state_round_trip_and_mismatch():
    params = [torch.zeros(6)]
    store = SketchStorage(params, dim=8, seed=5)
    r = store.row(("task", 0, 0))
    store.add(r, 0, torch.ones(6))
    store.combine(torch.tensor([0.5]), 1.0, [None])
    store.reset()
    other = SketchStorage(params, dim=8, seed=5)
    other.load_state_dict(store.state_dict())
    assert other.key == store.key and other._coef == {("task", 0, 0): 0.5}
    with pytest.raises(ValueError, match="sketch_dim=8"):
        SketchStorage(params, dim=16, seed=5).load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match="'sketch' gradient storage"):
        ExactStorage(params).load_state_dict(store.state_dict())


def test_reset_draws_a_new_hash_and_empties_the_rows():
    store = SketchStorage([torch.zeros(10)], dim=4)
    r = store.row("x")
    store.add(r, 0, torch.ones(10))
    k0 = store.key
    store.reset()
    assert store.key != k0 and float(store.data.abs().sum()) == 0.0 and store.finish() == []


def test_exact_storage_stats_and_combine_match_explicit_vectors():
    params = _params()
    store = ExactStorage(params, dtype=torch.float64, order=lambda k: k)
    g = torch.Generator().manual_seed(1)
    rows = {k: [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params] for k in (0, 1)}
    for k, gs in rows.items():
        r = store.row(k)
        for i, gr in enumerate(gs):
            store.add(r, i, gr)
        assert store.hook_scale(r) == 1.0
    store.finish()
    flat = torch.stack([torch.cat([t.reshape(-1) for t in rows[k]]) for k in (0, 1)])
    pgrad = [2.0 * (rows[0][i] + rows[1][i]) for i in range(2)]  # a clip by 2
    row_gram, dots, sq = store.row_stats(pgrad)
    torch.testing.assert_close(row_gram, flat @ flat.T)
    torch.testing.assert_close(dots, flat @ (2 * flat.sum(0)))
    torch.testing.assert_close(store.applied(), torch.ones(2, dtype=torch.float64))
    coef = torch.tensor([0.5, 3.0], dtype=torch.float64)
    assert torch.equal(store.combine(coef, 2.0, pgrad), coef)
    got = torch.cat([t.reshape(-1) for t in pgrad])
    torch.testing.assert_close(got, 2.0 * (coef @ flat))
    store.combine(coef, 0.5, pgrad, rebuild=True)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in pgrad]), 0.5 * (coef @ flat))
    assert store.figure_errors(row_gram, torch.ones(2), 2) is None and store.entry_error(row_gram, 0, 1) is None


def test_exact_combine_with_unit_coefficients_leaves_p_grad_bit_identical():
    params = [torch.zeros(5)]
    store = ExactStorage(params)
    r = store.row("a")
    store.add(r, 0, torch.full((5,), 0.1))
    grad = torch.full((5,), 0.1)
    before = grad.clone()
    store.combine(torch.ones(1), 0.7, [grad])
    assert torch.equal(grad, before)


def test_lagged_exact_storage_keeps_exact_rows_and_defers_the_correction_to_the_hooks():
    from balancedmix.storage import LaggedExactStorage, make_storage

    params = [torch.zeros(4, dtype=torch.float64)]
    store = make_storage(params, params, None, dtype=torch.float64, order=lambda k: k, subset=True)
    assert isinstance(store, LaggedExactStorage) and store.lagged and store.holds_gradients and not store.can_rebuild
    a = store.row("a")
    store.add(a, 0, torch.ones(4, dtype=torch.float64))
    store.finish()
    grad = torch.ones(4, dtype=torch.float64)
    applied = store.combine(torch.tensor([3.0]), 1.0, [grad])
    assert torch.equal(grad, torch.ones(4, dtype=torch.float64))  # p.grad untouched now
    assert applied.tolist() == [1.0] and store.hook_scale(a) == 3.0  # the hooks scale next step
    row_gram, _, _ = store.row_stats(None)
    assert row_gram.tolist() == [[4.0]]  # exact
    other = make_storage(params, params, None, dtype=torch.float64, order=lambda k: k, subset=True)
    other.load_state_dict(store.state_dict())
    other.row("a")
    assert other.hook_scale(0) == 3.0
    with pytest.raises(ValueError, match="cannot rebuild"):
        store.combine(torch.ones(1), 1.0, [grad], rebuild=True)



@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.booleans(), st.integers(0, 10_000), st.booleans())
def test_closed_form_figure_errors_equal_the_delta_method(k, untagged, seed, zero_task):
    from balancedmix.sketch import figure_standard_errors

    g = torch.Generator().manual_seed(seed)
    m = k + int(untagged)
    vecs = torch.randn(m, 30, dtype=torch.float64, generator=g)
    if zero_task:
        vecs[0] = 0.0
    gram = vecs @ vecs.T
    coef = torch.rand(m, dtype=torch.float64, generator=g) + 0.2
    if untagged:
        coef[-1] = 1.0
    d = 128
    norm_se, share_se, cos_se = figure_standard_errors(gram, coef, k, d)
    iu = torch.triu_indices(k, k, 1)

    def fn(gm):
        cos = stats.cosines(gm[:k, :k])
        return torch.cat([stats.norms(gm), stats.update_shares(gm, coef), cos[iu[0], iu[1]]])

    want = delta_standard_errors(fn, gram, d)
    torch.testing.assert_close(norm_se, want[:m], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(share_se, want[m : 2 * m], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(cos_se[iu[0], iu[1]], want[2 * m :], rtol=1e-6, atol=1e-12)
