"""The speed variants of the Metal sparse-row kernels (issue 13 item 8), through the Linux Metal harness against
a float64 oracle and the pure-MLX references: the blocked gather_dot (x[n] read once per block of slots, not once
per slot), the segmented scatter_outer (a latent that fires on most tokens is summed by many threads, not by one
serial loop) and the wide gather_weighted_sum / scatter_outer (4 neighbouring columns per thread). The old kernels
stay the default; SAE_MLX_GWS / SAE_MLX_GATHER_DOT / SAE_MLX_SCATTER select the variants."""
from __future__ import annotations

import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from parity.metal_harness import harness as H  # noqa: E402
from sae_mlx.kernels import sparse_rows as sr  # noqa: E402

HARNESS = sys.platform.startswith("linux") and H.compiler_missing() is None
harness_only = pytest.mark.skipif(not HARNESS, reason="the Metal harness runs on Linux with g++ or clang++")
metal_only = pytest.mark.skipif(not sr.HAS_METAL, reason="needs Apple-silicon Metal")

BF16, F32, F16 = mx.bfloat16, mx.float32, mx.float16
I32, U32, I64 = mx.int32, mx.uint32, mx.int64
_NP_IDX = {I32: np.int32, U32: np.uint32, I64: np.int64}


def to_f64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def make_inputs(seed, n, k, m, d, wdt, tdt, idt, oob=False):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m, size=(n, k))
    if k > 1:
        idx[:, -1] = idx[:, 0]  # repeated latent within a row
    if oob:  # out-of-range entries: the kernels must skip them
        idx[0, 0] = m
        idx[-1, -1] = m + 1000
        if idt != U32:
            idx[n // 2, 0] = -1
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(wdt)
    table = mx.array(rng.standard_normal((m, d)).astype(np.float32)).astype(tdt)
    rows = mx.array(rng.standard_normal((n, d)).astype(np.float32)).astype(wdt)
    return w, mx.array(idx.astype(_NP_IDX[idt])), table, rows


def oracle(kind, w, idx, table, rows, m):
    """float64, skipping out-of-range indices (what the Metal kernels promise)."""
    i = np.array(idx).astype(np.int64)
    ok = (i >= 0) & (i < m)
    ic = np.where(ok, i, 0)
    if kind == "gdot":
        return (to_f64(table)[ic] * to_f64(rows)[:, None, :]).sum(axis=-1) * ok
    if kind == "gws":
        return ((to_f64(w) * ok)[:, :, None] * to_f64(table)[ic]).sum(axis=1)
    out = np.zeros((m, rows.shape[1]))
    wr = (to_f64(w) * ok)[:, :, None] * to_f64(rows)[:, None, :]
    np.add.at(out, ic.reshape(-1), wr.reshape(-1, rows.shape[1]))
    return out


def _assert_close(got: np.ndarray, ref: np.ndarray, out_is_bf16: bool, what: str):
    tol = 1e-2 if out_is_bf16 else 1e-5
    err = float(np.abs(got - ref).max())
    assert err <= tol * max(float(np.abs(ref).max()), 1e-30), f"{what}: max|diff| {err:.3g}"

# name: (kernel, N, k, M, d, weights/rows dtype, table dtype, index dtype, out-of-range indices, heavy latent);
# kernel "scatter" is the segmented one, "scatter-wide" the wide one. d = 77 / 129 / 35 / 9: the last thread of a
# wide row has 1 column (77 = 4 * 19 + 1), 1, 3, 1.
CASES = {
    "gws-wide-d77": ("gws", 13, 4, 29, 77, F32, F32, I32, False, False),
    "gws-wide-bf16-d129-oob": ("gws", 7, 5, 19, 129, BF16, BF16, U32, True, False),
    "gws-wide-mixed-d300-k1": ("gws", 5, 1, 37, 300, BF16, F32, I64, False, False),
    "gws-wide-d3": ("gws", 3, 2, 5, 3, F32, F32, I32, False, False),
    "scatter-wide-heavy-d35": ("scatter-wide", 700, 2, 9, 35, F32, F32, I32, False, True),
    "scatter-wide-bf16-oob": ("scatter-wide", 60, 3, 17, 129, BF16, BF16, I64, True, False),
    "gdot-k1": ("gdot", 5, 1, 9, 77, F32, F32, I32, False, False),
    "gdot-k5-partial-block": ("gdot", 6, 5, 11, 40, F32, F32, I32, False, False),
    "gdot-k9-bf16": ("gdot", 7, 9, 13, 129, BF16, BF16, U32, False, False),
    "gdot-mixed-oob": ("gdot", 9, 6, 11, 33, F32, BF16, I64, True, False),
    "gdot-k40-many-groups": ("gdot", 3, 40, 50, 65, F32, F32, I32, False, False),
    # heavy latent: latent 3 in every token's first slot, 700 entries = 3 segments (two full, one partial)
    "scatter-heavy": ("scatter", 700, 2, 9, 35, F32, F32, I32, False, True),
    "scatter-heavy-bf16-oob": ("scatter", 600, 3, 17, 20, BF16, BF16, I32, True, True),
    "scatter-mixed-i64": ("scatter", 13, 4, 29, 77, BF16, F32, I64, False, False),
    "scatter-m1": ("scatter", 3, 2, 1, 9, F32, F32, I32, False, False),
    "scatter-empty-latents": ("scatter", 4, 2, 40, 8, F32, F32, U32, False, False),
}


def run_case(name, monkeypatch, through_harness=True):
    kind, n, k, m, d, wdt, tdt, idt, oob, heavy = CASES[name]
    w, idx, table, rows = make_inputs(len(name), n, k, m, d, wdt, tdt, idt, oob)
    if heavy:
        heavy_idx = np.array(idx)
        heavy_idx[1:, 0] = 3
        idx = mx.array(heavy_idx)
    monkeypatch.setenv(sr.GWS_ENV, "wide")
    monkeypatch.setenv(sr.GATHER_DOT_ENV, "blocked")
    monkeypatch.setenv(sr.SCATTER_ENV, "wide" if kind == "scatter-wide" else "segmented")
    if kind == "gdot":
        out_dtype = sr._result_dtype(rows.dtype, table.dtype)
        call = lambda: sr.gather_dot_metal(rows, table, idx)  # noqa: E731
    elif kind == "gws":
        out_dtype = sr._result_dtype(w.dtype, table.dtype)
        call = lambda: sr.gather_weighted_sum_metal(w, idx, table)  # noqa: E731
    else:
        out_dtype = sr._result_dtype(w.dtype, rows.dtype)
        call = lambda: sr.scatter_outer_metal(w, idx, rows, m)  # noqa: E731
    if through_harness:
        monkeypatch.setenv("SAE_EAGER", "1")
        with H.kernels_through_harness() as ran:
            got = call()
        expect_kernels = {"gdot": ["sae_gather_dot_blocked"], "gws": ["sae_gather_weighted_sum_wide"],
                          "scatter-wide": ["sae_scatter_outer_wide"],
                          "scatter": ["sae_scatter_segment_partial", "sae_scatter_segment_reduce"]}[kind]
        assert ran == expect_kernels
    else:
        with mx.stream(mx.gpu):
            got = call()
    assert got.dtype == out_dtype
    exact = oracle(kind, w, idx, table, rows, m)
    ref = None
    if not oob:
        ref = {"gdot": lambda: sr.gather_dot_reference(rows, table, idx),
               "gws": lambda: sr.gather_weighted_sum_reference(w, idx, table)}.get(
            kind, lambda: sr.scatter_outer_reference(w, idx, rows, m))()
    return got, exact, ref, out_dtype == BF16


@harness_only
@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_oracle_and_reference(name, monkeypatch):
    got, exact, ref, bf16 = run_case(name, monkeypatch)
    _assert_close(to_f64(got), exact, bf16, "vs float64 oracle")
    if ref is not None:
        _assert_close(to_f64(got), to_f64(ref), bf16, "vs MLX reference")


def test_segments_split_the_heavy_latent():
    """The segment layout: latent 3's 700 entries in 3 segments, every other latent in one (or none)."""
    idx = np.zeros((700, 2), np.int32)
    idx[:, 0] = 3
    idx[:, 1] = np.arange(700) % 5 + 4  # latents 4..8, 140 entries each
    order, offsets = sr._csr_by_latent(mx.array(idx), 9)
    seg_offsets, seg_latent = sr._segments(offsets, idx.size, 9)
    per_latent = np.diff(np.array(seg_offsets))
    assert per_latent.tolist() == [0, 0, 0, 3, 1, 1, 1, 1, 1]
    used = int(np.array(seg_offsets)[-1])
    assert np.array(seg_latent)[:used].tolist() == [3, 3, 3, 4, 5, 6, 7, 8]
    assert seg_latent.shape[0] >= used


def test_defaults_and_settings(monkeypatch):
    for env in (sr.GWS_ENV, sr.GATHER_DOT_ENV, sr.SCATTER_ENV):
        monkeypatch.delenv(env, raising=False)
    assert [sr.kernel_variant(env) for env in (sr.GWS_ENV, sr.GATHER_DOT_ENV, sr.SCATTER_ENV)] == \
        ["scalar", "lanes", "serial"]
    w, idx, table, rows = make_inputs(1, 4, 3, 7, 9, F32, F32, I32)
    assert sr.plan_gather_dot(rows, table, idx).spec.name == "sae_gather_dot"
    monkeypatch.setenv(sr.GATHER_DOT_ENV, "blocked")
    assert sr.plan_gather_dot(rows, table, idx).spec.name == "sae_gather_dot_blocked"
    monkeypatch.setenv(sr.SCATTER_ENV, "atomic")
    with pytest.raises(ValueError, match="SAE_MLX_SCATTER must be one of serial, segmented, wide"):
        sr.kernel_variant(sr.SCATTER_ENV)


@pytest.mark.metal
@metal_only
@pytest.mark.parametrize("name", list(CASES))
def test_real_metal_variant_matches_oracle(name, monkeypatch):
    """On Apple silicon: the variant kernels themselves, on the GPU."""
    got, exact, ref, bf16 = run_case(name, monkeypatch, through_harness=False)
    _assert_close(to_f64(got), exact, bf16, "vs float64 oracle")


@harness_only
def test_one_latent_layout_per_selection_in_a_training_step(monkeypatch):
    """A forward + backward of the coder with the Metal kernels (through the harness) builds the latent-sorted CSR
    layout once per selection (TopK, AuxK, Multi-TopK), not once per weight gradient; the gradients
    equal the reference path's."""
    import mlx.nn as nn

    from sae_core.config import SparseCoderConfig
    from sae_mlx import SparseCoder

    mx.random.seed(5)
    sae = SparseCoder(12, SparseCoderConfig(num_latents=40, k=4, multi_topk=True))
    x = mx.random.normal((10, 12))
    dead = mx.array(np.arange(40) % 5 == 0)

    def loss(model):
        out = model(x, dead_mask=dead)
        return out.fvu + out.auxk_loss + out.multi_topk_fvu / 8

    # AuxK through the sparse kernels (not the dense matmuls over the dead rows), so it has a layout too
    monkeypatch.setattr(SparseCoder, "aux_dense_max_ratio", 0.0)
    ref_loss, ref_grads = nn.value_and_grad(sae, loss)(sae)
    mx.eval(ref_loss, ref_grads)
    built = []
    real = sr.latent_csr
    monkeypatch.setattr(sr, "latent_csr", lambda indices, m: built.append(m) or real(indices, m))
    monkeypatch.setenv("SAE_EAGER", "1")
    with H.kernels_through_harness() as ran:
        got_loss, got_grads = nn.value_and_grad(sae, loss)(sae)
        mx.eval(got_loss, got_grads)
    scatters = ran.count("sae_scatter_outer")
    assert scatters == 6 and len(built) == 3  # 2 weight gradients per selection, 1 layout per selection
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    for a, b in ((got_grads["encoder"]["weight"], ref_grads["encoder"]["weight"]),
                 (got_grads["W_dec"], ref_grads["W_dec"])):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


VARIANT_SETS = {
    "topk-metal+gws-wide+gather-dot-blocked+scatter-segmented": {
        "SAE_MLX_TOPK": "metal", sr.GWS_ENV: "wide", sr.GATHER_DOT_ENV: "blocked", sr.SCATTER_ENV: "segmented"},
    "scatter-wide": {sr.SCATTER_ENV: "wide"},
}
VARIANT_KERNELS = {
    "topk-metal+gws-wide+gather-dot-blocked+scatter-segmented": {
        "sae_topk_rows", "sae_gather_weighted_sum_wide", "sae_gather_dot_blocked", "sae_scatter_segment_partial",
        "sae_scatter_segment_reduce"},
    "scatter-wide": {"sae_scatter_outer_wide", "sae_gather_weighted_sum", "sae_gather_dot"},
}


@harness_only
@pytest.mark.parametrize("variants", list(VARIANT_SETS))
def test_parity_suite_passes_with_the_variants(variants, monkeypatch):
    """The whole parity suite's metal-harness path (every config, dead-mask and dtype case of `--quick`) with the
    variants switched on: every output and gradient within its ceiling of the float64 oracle."""
    from parity.suite import run_suite

    for env, value in VARIANT_SETS[variants].items():
        monkeypatch.setenv(env, value)
    ran = set()
    real_run_launch = H.run_launch
    monkeypatch.setattr(H, "run_launch",
                        lambda launch, **kw: ran.add(launch.spec.name) or real_run_launch(launch, **kw))
    rows = run_suite(["metal-harness"], ("float32", "bfloat16"), quick=True)
    assert rows and not [(r.quantity, r.case) for r in rows if not r.ok]
    assert ran == VARIANT_KERNELS[variants]
