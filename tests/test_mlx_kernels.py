"""sae_mlx.kernels.sparse_rows: the pure-MLX references against a float64 NumPy computation, the dispatch rules,
the custom-vjp wrappers (eager, under mx.compile, with nn.value_and_grad), and, on Apple silicon only, the real
Metal kernels against the references. The Metal kernel bodies are checked on Linux in test_metal_harness.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from sae_mlx.kernels import sparse_rows as sr  # noqa: E402

F32, BF16, F16 = mx.float32, mx.bfloat16, mx.float16
HAS_METAL = bool(mx.metal.is_available())
metal_only = pytest.mark.skipif(
    not HAS_METAL, reason="needs Apple-silicon Metal (mx.metal.is_available() is False on this machine)"
)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def to_f64(a) -> np.ndarray:
    """An MLX array as float64 NumPy (bf16 goes through uint16 + ml_dtypes: np.array of a bf16 array raises)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16).astype(np.float64)
    return np.array(a).astype(np.float64)


def make_inputs(seed, n, k, m, d, wdt=F32, tdt=F32, idt=mx.int32, repeat_in_row=True):
    """weights [n,k] (wdt), indices [n,k] (idt; repeats across and, if asked, within rows; latents 0 and m - 1
    always among them), table [m,d] and rows [n,d] (tdt). Values are cast to the MLX dtype here; the oracle reads
    them back from MLX."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m, size=(n, k))
    if repeat_in_row and k > 1:
        idx[:, -1] = idx[:, 0]  # the same latent twice in one row
    idx[n // 2] = idx[0]  # the same row of latents on two tokens
    idx[-1, 0], idx[0, -1] = m - 1, 0  # the last and the first latent: an off-by-one in an index bound shows
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(wdt)
    ind = mx.array(idx.astype({mx.int32: np.int32, mx.uint32: np.uint32, mx.int64: np.int64}[idt]))
    table = mx.array(rng.standard_normal((m, d)).astype(np.float32)).astype(tdt)
    rows = mx.array(rng.standard_normal((n, d)).astype(np.float32)).astype(tdt)
    return w, ind, table, rows


def oracle_gws(w, idx, table):
    w, idx, t = to_f64(w), np.array(idx).astype(np.int64), to_f64(table)
    return (w[:, :, None] * t[idx]).sum(axis=1)


def oracle_gdot(rows, table, idx):
    r, t, idx = to_f64(rows), to_f64(table), np.array(idx).astype(np.int64)
    return (t[idx] * r[:, None, :]).sum(axis=-1)


def oracle_scatter(w, idx, rows, m):
    w, idx, r = to_f64(w), np.array(idx).astype(np.int64), to_f64(rows)
    out = np.zeros((m, r.shape[1]))
    np.add.at(out, idx.reshape(-1), (w[:, :, None] * r[:, None, :]).reshape(-1, r.shape[1]))
    return out


def assert_close(got, ref, out_dtype):
    """docs/SPEC.md section 4 ceilings, tighter for fp32: max|diff| <= tol * max|ref|."""
    assert got.dtype == out_dtype, (got.dtype, out_dtype)
    g = to_f64(got)
    assert g.shape == ref.shape, (g.shape, ref.shape)
    tol = 1e-5 if out_dtype == F32 else 1e-2
    scale = max(float(np.abs(ref).max()), 1e-30) if ref.size else 1.0
    err = float(np.abs(g - ref).max()) if ref.size else 0.0
    assert err <= tol * scale, f"max|diff| {err:.3g} > {tol} * max|ref| {scale:.3g}"


# N, k, M, d: odd widths, k = 1, M smaller than N*k (repeats), one token
SHAPES = [(13, 4, 29, 77), (9, 1, 5, 129), (1, 3, 2, 7)]
DTYPES = [(F32, F32, F32), (BF16, BF16, BF16), (BF16, F32, F32), (F16, BF16, F32)]
IDX = [mx.int32, mx.uint32, mx.int64]


# ----------------------------------------------------------------------------------------------------------------
# references vs float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}k{}M{}d{}".format(*s))
@pytest.mark.parametrize("dts", DTYPES, ids=lambda t: "-".join(str(x).split(".")[-1] for x in t))
@pytest.mark.parametrize("idt", IDX, ids=lambda t: str(t).split(".")[-1])
def test_references_match_float64(shape, dts, idt):
    n, k, m, d = shape
    wdt, tdt, out_dt = dts
    w, idx, table, rows = make_inputs(sum(shape), n, k, m, d, wdt, tdt, idt)
    assert_close(sr.gather_weighted_sum_reference(w, idx, table), oracle_gws(w, idx, table), out_dt)
    # gather_dot's two float inputs are rows and table: use the weights' dtype for rows to mix dtypes too
    rows_w = rows.astype(wdt)
    assert_close(sr.gather_dot_reference(rows_w, table, idx), oracle_gdot(rows_w, table, idx), out_dt)
    cot = rows.astype(tdt)
    assert_close(sr.scatter_outer_reference(w, idx, cot, m), oracle_scatter(w, idx, cot, m), out_dt)


def test_dispatchers_use_the_reference_without_metal(monkeypatch):
    w, idx, table, rows = make_inputs(1, 6, 3, 5, 10)
    if HAS_METAL:
        monkeypatch.setenv("SAE_EAGER", "1")
    assert not sr.use_metal()
    for plain, ref, args in [
        (sr.gather_weighted_sum, sr.gather_weighted_sum_reference, (w, idx, table)),
        (sr.gather_dot, sr.gather_dot_reference, (rows, table, idx)),
        (sr.scatter_outer, sr.scatter_outer_reference, (w, idx, rows, 5)),
    ]:
        np.testing.assert_array_equal(np.array(plain(*args)), np.array(ref(*args)))


@pytest.mark.parametrize("value,eager", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_sae_eager_env(monkeypatch, value, eager):
    monkeypatch.setenv("SAE_EAGER", value)
    assert sr._eager_forced() is eager
    if eager:
        assert sr.use_metal() is False
    else:
        assert sr.use_metal() is (HAS_METAL and mx.default_device().type == mx.DeviceType.gpu)


def test_chunked_references_equal_unchunked(monkeypatch):
    w, idx, table, rows = make_inputs(2, 11, 3, 7, 9, idt=mx.uint32)
    full = [
        np.array(sr.gather_weighted_sum_reference(w, idx, table)),
        np.array(sr.gather_dot_reference(rows, table, idx)),
        np.array(sr.scatter_outer_reference(w, idx, rows, 7)),
    ]
    monkeypatch.setattr(sr, "_REF_CHUNK_ELEMS", 3 * 9 * 2)  # two tokens per chunk -> 6 chunks, last one partial
    assert len(sr._token_chunks(11, 3 * 9)) == 6
    chunked = [
        np.array(sr.gather_weighted_sum_reference(w, idx, table)),
        np.array(sr.gather_dot_reference(rows, table, idx)),
        np.array(sr.scatter_outer_reference(w, idx, rows, 7)),
    ]
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_empty_and_unused_rows():
    w, idx, table, rows = make_inputs(3, 4, 2, 50, 6)
    out = np.array(sr.scatter_outer_reference(w, idx, rows, 50))
    unused = np.setdiff1d(np.arange(50), np.array(idx).reshape(-1))
    assert np.all(out[unused] == 0)
    z = mx.zeros((0, 2), dtype=F32)
    zi = mx.zeros((0, 2), dtype=mx.int32)
    assert sr.gather_weighted_sum(z, zi, table).shape == (0, 6)
    assert sr.gather_dot(mx.zeros((0, 6)), table, zi).shape == (0, 2)
    assert sr.scatter_outer(z, zi, mx.zeros((0, 6)), 50).shape == (50, 6)
    assert not np.any(np.array(sr.scatter_outer(z, zi, mx.zeros((0, 6)), 50)))


def test_validation_errors():
    w, idx, table, rows = make_inputs(4, 3, 2, 5, 4)
    with pytest.raises(ValueError, match="int32, uint32 or int64"):
        sr.gather_weighted_sum(w, idx.astype(mx.int16), table)
    with pytest.raises(ValueError, match="same shape"):
        sr.gather_weighted_sum(w[:, :1], idx, table)
    with pytest.raises(ValueError, match="disagree on d"):
        sr.gather_dot(rows[:, :3], table, idx)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        sr.scatter_outer(w.astype(mx.int32), idx, rows, 5)
    with pytest.raises(ValueError, match="num_rows"):
        sr.scatter_outer(w, idx, rows, -1)
    with pytest.raises(TypeError, match="mlx.core.array"):
        sr.gather_dot(np.zeros((3, 4), np.float32), table, idx)


def test_int32_element_limit_raises_clearly():
    # a [2**21, 1024] fp32 scatter target would have 2**31 elements: refused before anything is allocated
    w = mx.ones((2, 1), dtype=F32)
    idx = mx.zeros((2, 1), dtype=mx.int32)
    rows = mx.ones((2, 1024), dtype=F32)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        sr.scatter_outer_reference(w, idx, rows, 2**21)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        sr.plan_scatter_outer(mx.ones((2**16, 2**15), dtype=F32), mx.zeros((2**16, 2**15), dtype=mx.int32),
                              mx.ones((2**16, 1), dtype=F32), 3)


# ----------------------------------------------------------------------------------------------------------------
# custom-vjp wrappers
# ----------------------------------------------------------------------------------------------------------------


def naive_decode(acts, indices, weight):
    return (acts[:, :, None] * weight[indices]).sum(axis=1)


def naive_encode(x, weight, indices):
    return (weight[indices] * x[:, None, :]).sum(axis=-1)


def _grad_case(seed=5, n=10, k=3, m=6, d=13, idt=mx.int32):
    w, idx, table, rows = make_inputs(seed, n, k, m, d, idt=idt)
    rng = np.random.default_rng(seed + 100)
    c_dec = mx.array(rng.standard_normal((n, d)).astype(np.float32))
    c_enc = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    return w, idx, table, rows, c_dec, c_enc


def _loss(decode, encode, idx, c_dec, c_enc):
    def loss(acts, weight, x):
        y = decode(acts, idx, weight)
        p = encode(x, weight, idx)
        return (y * c_dec).sum() + (y * y).sum() * 0.5 + (p * c_enc).sum()

    return loss


@pytest.mark.parametrize("idt", IDX, ids=lambda t: str(t).split(".")[-1])
def test_vjp_matches_autograd_of_naive_formula(idt):
    w, idx, table, rows, c_dec, c_enc = _grad_case(idt=idt)
    ours = mx.value_and_grad(_loss(sr.sparse_decode, sr.sparse_encode, idx, c_dec, c_enc), argnums=(0, 1, 2))
    ref = mx.value_and_grad(_loss(naive_decode, naive_encode, idx, c_dec, c_enc), argnums=(0, 1, 2))
    (v1, g1), (v2, g2) = ours(w, table, rows), ref(w, table, rows)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(g1, g2):
        assert a.dtype == F32
        b = np.array(b)
        assert np.abs(np.array(a) - b).max() <= 1e-5 * np.abs(b).max()


def test_vjp_inside_compile():
    w, idx, table, rows, c_dec, c_enc = _grad_case(seed=6, n=7, k=1, m=4, d=77)
    loss = _loss(sr.sparse_decode, sr.sparse_encode, idx, c_dec, c_enc)
    compiled = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))
    v2, g2 = mx.value_and_grad(_loss(naive_decode, naive_encode, idx, c_dec, c_enc), argnums=(0, 1, 2))(w, table, rows)
    for _ in range(2):  # second call reuses the compiled graph
        v1, g1 = compiled(w, table, rows)
        np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
        for a, b in zip(g1, g2):
            b = np.array(b)
            assert np.abs(np.array(a) - b).max() <= 1e-5 * np.abs(b).max()


def test_vjp_with_nn_value_and_grad_and_index_cotangent():
    w, idx, table, rows, c_dec, c_enc = _grad_case(seed=7, idt=mx.uint32)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = table

        def __call__(self, acts, x):
            return sr.sparse_decode(acts, idx, self.weight), sr.sparse_encode(x, self.weight, idx)

    model = Tiny()

    def loss_fn(model, acts, x):
        y, p = model(acts, x)
        return (y * c_dec).sum() + (p * c_enc).sum()

    val, grads = nn.value_and_grad(model, loss_fn)(model, w, rows)
    ref = mx.grad(lambda W: (naive_decode(w, idx, W) * c_dec).sum() + (naive_encode(rows, W, idx) * c_enc).sum())(table)
    np.testing.assert_allclose(np.array(grads["weight"]), np.array(ref), rtol=1e-5, atol=1e-5)
    # the indices' cotangent is zeros of the index dtype
    d_idx = mx.grad(lambda a, i: sr.sparse_decode(a, i, table).sum(), argnums=1)(w, idx)
    assert d_idx.shape == idx.shape and not np.any(np.array(d_idx))


def test_vjp_bf16_grads_keep_their_dtype():
    w, idx, table, rows = make_inputs(8, 9, 4, 11, 33, wdt=BF16, tdt=BF16)
    loss = lambda a, W, x: sr.sparse_decode(a, idx, W).astype(F32).sum() + sr.sparse_encode(x, W, idx).astype(F32).sum()
    naive = lambda a, W, x: (naive_decode(a.astype(F32), idx, W.astype(F32)).sum()
                             + naive_encode(x.astype(F32), W.astype(F32), idx).sum())
    g1 = mx.grad(loss, argnums=(0, 1, 2))(w, table, rows)
    g2 = mx.grad(naive, argnums=(0, 1, 2))(w, table, rows)
    for a, b in zip(g1, g2):
        assert a.dtype == BF16
        b = to_f64(b)
        assert np.abs(to_f64(a) - b).max() <= 1e-2 * np.abs(b).max()


# ----------------------------------------------------------------------------------------------------------------
# Apple silicon only: the real Metal kernels (a Mac user's pytest runs these)
# ----------------------------------------------------------------------------------------------------------------

METAL_SHAPES = [(13, 4, 29, 77), (9, 1, 5, 129), (300, 32, 1000, 300), (7, 9, 3, 1)]


@pytest.mark.parametrize("shape", METAL_SHAPES, ids=lambda s: "N{}k{}M{}d{}".format(*s))
@pytest.mark.parametrize("dts", DTYPES, ids=lambda t: "-".join(str(x).split(".")[-1] for x in t))
@pytest.mark.parametrize("idt", IDX, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.metal
@metal_only
def test_metal_kernels_match_reference(shape, dts, idt):
    n, k, m, d = shape
    wdt, tdt, out_dt = dts
    w, idx, table, rows = make_inputs(sum(shape), n, k, m, d, wdt, tdt, idt)
    with mx.stream(mx.gpu):
        pairs = [
            (sr.gather_weighted_sum_metal(w, idx, table), oracle_gws(w, idx, table)),
            (sr.gather_dot_metal(rows.astype(wdt), table, idx), oracle_gdot(rows.astype(wdt), table, idx)),
            (sr.scatter_outer_metal(w, idx, rows, m), oracle_scatter(w, idx, rows, m)),
        ]
        for got, ref in pairs:
            assert_close(got, ref, out_dt)


@pytest.mark.metal
@metal_only
def test_metal_dispatch_and_vjp_under_compile(monkeypatch):
    monkeypatch.delenv("SAE_EAGER", raising=False)
    if mx.default_device().type != mx.DeviceType.gpu:
        pytest.skip("the default MLX device is not the GPU")
    assert sr.use_metal()
    w, idx, table, rows, c_dec, c_enc = _grad_case(seed=9, n=33, k=5, m=40, d=129)
    loss = _loss(sr.sparse_decode, sr.sparse_encode, idx, c_dec, c_enc)
    v1, g1 = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))(w, table, rows)
    v2, g2 = mx.value_and_grad(_loss(naive_decode, naive_encode, idx, c_dec, c_enc), argnums=(0, 1, 2))(
        w, table, rows
    )
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-4)
    for a, b in zip(g1, g2):
        b = np.array(b)
        assert np.abs(np.array(a) - b).max() <= 1e-4 * np.abs(b).max()


# ---- row_subset: AuxK over the dead rows with dense matmuls, against MLX's autograd ----

@pytest.mark.parametrize("raise_only", [False, True], ids=["exact", "raise-only"])
@pytest.mark.parametrize("dtype", [F32, mx.bfloat16], ids=["fp32", "bf16"])
def test_subset_decode_matches_autograd_reference(dtype, raise_only):
    from sae_mlx.kernels.row_subset import subset_decode, subset_decode_reference

    rng = np.random.default_rng(0)
    n, d_in, d_out, m, rows, per_token = 29, 13, 11, 40, 9, 4
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    w_enc = (rng.normal(size=(m, d_in)) / d_in**0.5).astype(np.float32)
    b_enc = (0.1 * rng.normal(size=m)).astype(np.float32)
    w_dec = rng.normal(size=(m, d_out)).astype(np.float32)
    subset = rng.permutation(m)[:rows].astype(np.int32)
    pre = np.maximum(x @ w_enc[subset].T + b_enc[subset], 0)
    slots = np.argsort(-pre, axis=1)[:, :per_token]  # some chosen slots hold 0 (relu'd): they pass no gradient
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, slots, np.take_along_axis(pre, slots, axis=1), axis=1)
    assert (np.take_along_axis(acts, slots, axis=1) == 0).any()
    params = [mx.array(a).astype(dtype) for a in (x, w_enc, b_enc, w_dec)]
    acts_mx, subset_mx = mx.array(acts).astype(dtype), mx.array(subset)
    weights = mx.array(np.linspace(-1, 1, n * d_out).reshape(n, d_out).astype(np.float32))

    results = []
    for fn in (subset_decode, subset_decode_reference):
        loss = lambda *p: (fn(acts_mx, subset_mx, *p, raise_only).astype(mx.float32) * weights).sum()
        out = fn(acts_mx, subset_mx, *params, raise_only)
        grads = mx.grad(loss, argnums=(0, 1, 2, 3))(*params)
        results.append([out, *grads])
    tol = {F32: 1e-5, mx.bfloat16: 2e-2}[dtype]
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        got, want = to_f64(got), to_f64(want)
        assert np.abs(want).max() > 0 and np.abs(got - want).max() <= tol * np.abs(want).max()
    outside = np.setdiff1d(np.arange(m), subset)
    for grad in results[0][2:]:
        assert np.abs(to_f64(grad)[outside]).max() == 0
    d_b_enc = to_f64(results[0][3])
    assert ((d_b_enc <= 0).all() and (d_b_enc < 0).any()) if raise_only else (d_b_enc > 0).any()


def test_subset_decode_rejects_mismatched_shapes():
    from sae_mlx.kernels.row_subset import subset_decode

    acts, rows, x = mx.zeros((5, 3)), mx.array([0, 2, 4]), mx.zeros((5, 4))
    w_enc, b_enc, w_dec = mx.zeros((6, 4)), mx.zeros((6,)), mx.zeros((6, 2))
    with pytest.raises(ValueError, match=r"acts must be \[N, len\(rows\)\]"):
        subset_decode(acts[:, :2], rows, x, w_enc, b_enc, w_dec)
    with pytest.raises(ValueError, match="must share M"):
        subset_decode(acts, rows, x, w_enc, b_enc, w_dec[:5])
