"""Per-row top-k selection for MLX: ``topk_indices(values [N, M], k) -> [N, k]`` int32, the columns of the k largest
values of each row, in no particular order.

Why a kernel: MLX 0.32 implements ``mx.argpartition`` on Metal as a full sort (``metal/sort.cpp``: "We direct arg
partition to sort for now"); at N=4096, M=24576 that sorts 100M values per selection, and a training step selects
up to three times (TopK, AuxK, Multi-TopK). The kernel is a radix select that never sorts.

Design notes: docs/internals.md, section `sae_mlx/kernels/topk.py`.
"""
from __future__ import annotations

import os

import mlx.core as mx

from . import sparse_rows
from .sparse_rows import MetalKernelSpec, MetalLaunch

__all__ = [
    "TOPK_ENV",
    "TOPK_METHODS",
    "topk_method",
    "use_metal_topk",
    "topk_indices",
    "topk_indices_reference",
    "topk_indices_metal",
    "plan_topk_indices",
    "TOPK_SPEC",
]

TOPK_ENV = "SAE_MLX_TOPK"
TOPK_METHODS = ("argpartition", "metal")

TOPK_HEADER = """
// An unsigned key with the order of the float: larger value <=> larger key; -0.0 is +0.0.
inline uint sae_order_key(float v) {
    const uint u = metal::as_type<uint>(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}
"""

TOPK_SOURCE = """
    // One SIMD group per row: grid (32, N, 1), threadgroup (32, ty, 1), so the 32 lanes of a SIMD group share n
    // and the early exit below is uniform across each group.
    const uint lane = thread_position_in_grid.x;
    const uint n = thread_position_in_grid.y;
    const uint N = uint(values_shape[0]);
    const uint M = uint(values_shape[1]);
    const uint K = uint(k);
    if (n >= N) {
        return;
    }
    const uint64_t row = uint64_t(n) * uint64_t(M);

    // radix select of the K-th largest key, 4 bits per pass, most significant digit first
    uint prefix = 0u;
    uint mask = 0u;
    uint want = K;  // how many of the entries matching `prefix` on `mask` still belong to the top K
    for (int shift = 28; shift >= 0; shift -= 4) {
        uint counts[16];
        for (int b = 0; b < 16; ++b) {
            counts[b] = 0u;
        }
        for (uint c = lane; c < M; c += 32u) {
            const uint key = sae_order_key(float(values[row + c]));
            if ((key & mask) == prefix) {
                counts[(key >> uint(shift)) & 15u] += 1u;
            }
        }
        uint digit = 0u;
        bool found = false;
        for (int b = 15; b >= 0; --b) {  // every lane runs every simd_sum: no divergence around them
            const uint total = metal::simd_sum(counts[b]);
            if (!found) {
                if (want <= total) {
                    digit = uint(b);
                    found = true;
                } else {
                    want -= total;
                }
            }
        }
        prefix |= digit << uint(shift);
        mask |= 15u << uint(shift);
    }

    // write the entries above the K-th largest key, then `want` entries equal to it (lowest columns first)
    const uint above = K - want;
    const uint64_t out_row = uint64_t(n) * uint64_t(K);
    uint written_above = 0u;
    uint written_equal = 0u;
    for (uint start = 0u; start < M; start += 32u) {
        const uint c = start + lane;
        const uint key = c < M ? sae_order_key(float(values[row + c])) : 0u;
        const bool is_above = c < M && key > prefix;
        const bool is_equal = c < M && key == prefix;
        const uint slot_above = metal::simd_prefix_exclusive_sum(is_above ? 1u : 0u);
        const uint slot_equal = metal::simd_prefix_exclusive_sum(is_equal ? 1u : 0u);
        if (is_above) {
            out[out_row + uint64_t(written_above + slot_above)] = int(c);
        }
        if (is_equal && written_equal + slot_equal < want) {
            out[out_row + uint64_t(above + written_equal + slot_equal)] = int(c);
        }
        written_above += metal::simd_sum(is_above ? 1u : 0u);
        written_equal += metal::simd_sum(is_equal ? 1u : 0u);
    }
"""

TOPK_SPEC = MetalKernelSpec(
    name="sae_topk_rows",
    input_names=("values", "k"),
    output_names=("out",),
    source=TOPK_SOURCE,
    header=TOPK_HEADER,
)
sparse_rows.KERNEL_SPECS[TOPK_SPEC.name] = TOPK_SPEC

_FLOAT_DTYPES = (mx.float32, mx.bfloat16, mx.float16)
_ROWS_PER_GROUP = 8  # SIMD groups (rows) per threadgroup: 256 threads


def topk_method() -> str:
    """The selection method named by ``SAE_MLX_TOPK`` (default ``argpartition``)."""
    method = os.environ.get(TOPK_ENV, "") or "argpartition"
    if method not in TOPK_METHODS:
        raise ValueError(f"{TOPK_ENV} must be one of {', '.join(TOPK_METHODS)}, got {method!r}")
    return method


def use_metal_topk() -> bool:
    """True when ``topk_indices`` runs the Metal kernel: the Metal kernels are in use and SAE_MLX_TOPK=metal."""
    return topk_method() == "metal" and sparse_rows.use_metal()


def _check(values, k) -> None:
    if not isinstance(values, mx.array) or values.ndim != 2:
        raise ValueError(f"values must be a 2-D mlx array [N, M], got {getattr(values, 'shape', type(values))}")
    if values.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= values.shape[1]:
        raise ValueError(f"k must be an int in [1, M={values.shape[1]}], got {k!r}")


def topk_indices_reference(values: mx.array, k: int) -> mx.array:
    """Columns of the k largest entries of each row, in no particular order (int32), by ``mx.argpartition``."""
    _check(values, k)
    return mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)


def plan_topk_indices(values: mx.array, k: int) -> MetalLaunch:
    """The Metal launch of ``topk_indices`` (N > 0)."""
    _check(values, k)
    n = values.shape[0]
    if values.shape[1] >= 2**31 or n * k >= 2**31:
        raise ValueError("topk_indices: M and N * k must stay below 2**31")
    return MetalLaunch(
        spec=TOPK_SPEC,
        inputs=[values, mx.array(k, dtype=mx.int32)],
        grid=(32, n, 1),
        threadgroup=(32, max(1, min(n, _ROWS_PER_GROUP)), 1),
        output_shapes=[(n, k)],
        output_dtypes=[mx.int32],
    )


def topk_indices_metal(values: mx.array, k: int) -> mx.array:
    """Metal radix select (needs Apple-silicon Metal); ties go to the lowest columns."""
    _check(values, k)
    if values.shape[0] == 0:
        return mx.zeros((0, k), dtype=mx.int32)
    return plan_topk_indices(values, k).run()[0]


def topk_indices(values: mx.array, k: int) -> mx.array:
    """Columns of the k largest entries of each row of ``values`` [N, M] -> [N, k] int32, in no particular order:
    the Metal kernel when :func:`use_metal_topk`, else ``mx.argpartition``."""
    if use_metal_topk():
        return topk_indices_metal(values, k)
    return topk_indices_reference(values, k)
