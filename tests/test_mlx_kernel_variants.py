"""The speed variants of the Metal sparse-row kernels (issue 13 item 8), through the Linux Metal harness against
a float64 oracle and the pure-MLX references: the blocked gather_dot (x[n] read once per block of slots, not once
per slot) and the segmented scatter_outer (a latent that fires on most tokens is summed by many threads, not by one
serial loop). The old kernels stay the default; SAE_MLX_GATHER_DOT / SAE_MLX_SCATTER select the variants."""
from __future__ import annotations

import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
if not sys.platform.startswith("linux"):  # pragma: no cover
    pytest.skip("the Metal harness targets Linux", allow_module_level=True)

from parity.metal_harness import harness as H  # noqa: E402
from sae_mlx.kernels import sparse_rows as sr  # noqa: E402

if H.compiler_missing():  # pragma: no cover
    pytest.skip(H.compiler_missing(), allow_module_level=True)

from test_metal_harness import BF16, F32, I32, I64, U32, _assert_close, make_inputs, oracle, to_f64  # noqa: E402

# name: (kernel, N, k, M, d, weights/rows dtype, table dtype, index dtype, out-of-range indices, heavy latent)
CASES = {
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


def run_case(name, monkeypatch):
    kind, n, k, m, d, wdt, tdt, idt, oob, heavy = CASES[name]
    w, idx, table, rows = make_inputs(len(name), n, k, m, d, wdt, tdt, idt, oob)
    if heavy:
        heavy_idx = np.array(idx)
        heavy_idx[1:, 0] = 3
        idx = mx.array(heavy_idx)
    monkeypatch.setenv("SAE_EAGER", "1")
    monkeypatch.setenv(sr.GATHER_DOT_ENV, "blocked")
    monkeypatch.setenv(sr.SCATTER_ENV, "segmented")
    with H.kernels_through_harness() as ran:
        if kind == "gdot":
            got = sr.gather_dot(rows, table, idx)
            out_dtype = sr._result_dtype(rows.dtype, table.dtype)
        else:
            got = sr.scatter_outer(w, idx, rows, m)
            out_dtype = sr._result_dtype(w.dtype, rows.dtype)
    expect_kernels = ["sae_gather_dot_blocked"] if kind == "gdot" else \
        ["sae_scatter_segment_partial", "sae_scatter_segment_reduce"]
    assert ran == expect_kernels
    assert got.dtype == out_dtype
    exact = oracle(kind, w, idx, table, rows, m)
    ref = None
    if not oob:
        ref = sr.gather_dot_reference(rows, table, idx) if kind == "gdot" else \
            sr.scatter_outer_reference(w, idx, rows, m)
    return got, exact, ref, out_dtype == BF16


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
    for env in (sr.GATHER_DOT_ENV, sr.SCATTER_ENV):
        monkeypatch.delenv(env, raising=False)
    assert sr.kernel_variant(sr.GATHER_DOT_ENV) == "lanes" and sr.kernel_variant(sr.SCATTER_ENV) == "serial"
    w, idx, table, rows = make_inputs(1, 4, 3, 7, 9, F32, F32, I32)
    assert sr.plan_gather_dot(rows, table, idx).spec.name == "sae_gather_dot"
    monkeypatch.setenv(sr.GATHER_DOT_ENV, "blocked")
    assert sr.plan_gather_dot(rows, table, idx).spec.name == "sae_gather_dot_blocked"
    monkeypatch.setenv(sr.SCATTER_ENV, "atomic")
    with pytest.raises(ValueError, match="SAE_MLX_SCATTER must be one of serial, segmented"):
        sr.kernel_variant(sr.SCATTER_ENV)
