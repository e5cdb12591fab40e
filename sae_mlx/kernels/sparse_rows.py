"""Sparse row kernels for TopK SAEs on MLX: gather / weighted-sum / scatter over rows of a [M, d] table.

The MLX twin of :mod:`sae_torch.kernels.sparse_rows` (same public names, ``*_metal`` in place of ``*_triton``).
Three primitives, each with a pure-MLX reference (``*_reference``, the path used wherever Metal is absent) and a
Metal kernel (``*_metal``, built with ``mx.fast.metal_kernel``), plus a dispatcher with the plain name:

Design notes: docs/internals.md, section `sae_mlx/kernels/sparse_rows.py`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import mlx.core as mx

__all__ = [
    "HAS_METAL",
    "use_metal",
    "gather_weighted_sum",
    "gather_weighted_sum_reference",
    "gather_weighted_sum_metal",
    "gather_dot",
    "gather_dot_reference",
    "gather_dot_metal",
    "scatter_outer",
    "scatter_outer_reference",
    "scatter_outer_metal",
    "sparse_decode",
    "sparse_encode",
    "latent_csr",
    "MetalKernelSpec",
    "MetalLaunch",
    "plan_gather_weighted_sum",
    "plan_gather_dot",
    "plan_scatter_outer",
    "KERNEL_SPECS",
]

_FLOAT_DTYPES = (mx.float32, mx.bfloat16, mx.float16)
_INDEX_DTYPES = (mx.int32, mx.uint32, mx.int64)

# MLX indexes with int32 in places: no single op of ours may see 2**31 or more elements.
_INT32_LIMIT = 2**31 - 1

# Upper bound on the number of elements of one [chunk, k, d] temporary in the references (64 MiB of fp32).
_REF_CHUNK_ELEMS = 1 << 24


def _metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - very old MLX builds without mx.metal
        return False


HAS_METAL = _metal_available()


# ----------------------------------------------------------------------------------------------------------------
# Dispatch helpers
# ----------------------------------------------------------------------------------------------------------------


def _eager_forced() -> bool:
    return os.environ.get("SAE_EAGER", "") not in ("", "0")


def use_metal() -> bool:
    """True when the Metal kernels should be used: Metal is available, the default device is the GPU and the
    environment variable ``SAE_EAGER`` is unset, empty or "0"."""
    if _eager_forced() or not _metal_available():
        return False
    return mx.default_device().type == mx.DeviceType.gpu


# Kernel variants that only a Mac can rank: the setting picks one, the first is the default.
GWS_ENV = "SAE_MLX_GWS"
GATHER_DOT_ENV = "SAE_MLX_GATHER_DOT"
SCATTER_ENV = "SAE_MLX_SCATTER"
KERNEL_VARIANTS = {GWS_ENV: ("scalar", "wide"), GATHER_DOT_ENV: ("lanes", "blocked"),
                   SCATTER_ENV: ("serial", "segmented", "wide")}


def kernel_variant(env: str) -> str:
    """The variant the environment variable ``env`` names (SAE_MLX_GWS: scalar | wide, SAE_MLX_GATHER_DOT:
    lanes | blocked, SAE_MLX_SCATTER: serial | segmented | wide); unset or empty is the first, the default."""
    choices = KERNEL_VARIANTS[env]
    value = os.environ.get(env, "") or choices[0]
    if value not in choices:
        raise ValueError(f"{env} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """MLX's promotion for our float dtypes: equal stays, fp32 wins, bf16 with fp16 gives fp32."""
    return a if a == b else mx.float32


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_float(name: str, a: Any) -> None:
    if not isinstance(a, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    if a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")


def _check_indices(indices: Any) -> None:
    if not isinstance(indices, mx.array):
        raise TypeError(f"indices must be an mlx.core.array, got {type(indices).__name__}")
    if indices.ndim != 2:
        raise ValueError(f"indices must be 2-D [N, k], got shape {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be int32, uint32 or int64, got {indices.dtype}")


def _check_same_shape(weights: mx.array, indices: mx.array) -> None:
    if tuple(weights.shape) != tuple(indices.shape):
        raise ValueError(
            f"weights and indices must have the same shape [N, k], got {tuple(weights.shape)} and "
            f"{tuple(indices.shape)}"
        )


def _check_size(what: str, count: int) -> None:
    if count > _INT32_LIMIT:
        raise ValueError(
            f"{what} would have {count} elements, at or above 2**31: MLX indexes with int32 in places, so this "
            f"is not supported; split the call (fewer tokens per batch) or shard the table"
        )


def _validate_gws(weights, indices, table) -> mx.Dtype:
    _check_float("weights", weights)
    _check_indices(indices)
    _check_float("table", table)
    _check_same_shape(weights, indices)
    return _result_dtype(weights.dtype, table.dtype)


def _validate_gdot(rows, table, indices) -> mx.Dtype:
    _check_float("rows", rows)
    _check_float("table", table)
    _check_indices(indices)
    if rows.shape[0] != indices.shape[0]:
        raise ValueError(
            f"rows [N, d] and indices [N, k] disagree on N: {tuple(rows.shape)} vs {tuple(indices.shape)}"
        )
    if rows.shape[1] != table.shape[1]:
        raise ValueError(
            f"rows [N, d] and table [M, d] disagree on d: {tuple(rows.shape)} vs {tuple(table.shape)}"
        )
    return _result_dtype(rows.dtype, table.dtype)


def _validate_scatter(weights, indices, rows, num_rows) -> mx.Dtype:
    _check_float("weights", weights)
    _check_indices(indices)
    _check_float("rows", rows)
    _check_same_shape(weights, indices)
    if rows.shape[0] != indices.shape[0]:
        raise ValueError(
            f"rows [N, d] and indices [N, k] disagree on N: {tuple(rows.shape)} vs {tuple(indices.shape)}"
        )
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    return _result_dtype(weights.dtype, rows.dtype)


def _token_chunks(n: int, per_token: int) -> list[tuple[int, int]]:
    """Split [0, n) into chunks whose [chunk, per_token] temporaries stay below _REF_CHUNK_ELEMS elements."""
    _check_size("one token's [k, d] slice", per_token)
    step = max(1, min(n, _REF_CHUNK_ELEMS // max(1, per_token)))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _concat_rows(parts: list[mx.array]) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# References (pure MLX; fp32 accumulation; tokens processed in chunks)
# ----------------------------------------------------------------------------------------------------------------


def gather_weighted_sum_reference(weights: mx.array, indices: mx.array, table: mx.array) -> mx.array:
    """``out[n] = sum_j weights[n, j] * table[indices[n, j]]`` -> [N, d], in fp32, chunked over tokens so the
    gathered [chunk, k, d] temporary stays below ~16M elements."""
    out_dtype = _validate_gws(weights, indices, table)
    n, k = indices.shape
    d = table.shape[1]
    _check_size("gather_weighted_sum output [N, d]", n * d)
    if n == 0 or d == 0 or k == 0:
        return mx.zeros((n, d), dtype=out_dtype)
    parts = []
    for s, e in _token_chunks(n, k * d):
        w = weights[s:e].astype(mx.float32)  # [c, k]
        g = mx.take(table, indices[s:e], axis=0).astype(mx.float32)  # [c, k, d]
        parts.append((w[:, :, None] * g).sum(axis=1))
    return _concat_rows(parts).astype(out_dtype)


def gather_dot_reference(rows: mx.array, table: mx.array, indices: mx.array) -> mx.array:
    """``out[n, j] = <rows[n], table[indices[n, j]]>`` -> [N, k], in fp32, chunked over tokens so the gathered
    [chunk, k, d] temporary stays below ~16M elements."""
    out_dtype = _validate_gdot(rows, table, indices)
    n, k = indices.shape
    d = rows.shape[1]
    _check_size("gather_dot output [N, k]", n * k)
    if n == 0 or k == 0 or d == 0:
        return mx.zeros((n, k), dtype=out_dtype)
    parts = []
    for s, e in _token_chunks(n, k * d):
        g = mx.take(table, indices[s:e], axis=0).astype(mx.float32)  # [c, k, d]
        r = rows[s:e].astype(mx.float32)[:, None, :]  # [c, 1, d]
        parts.append((g * r).sum(axis=-1))
    return _concat_rows(parts).astype(out_dtype)


def scatter_outer_reference(weights: mx.array, indices: mx.array, rows: mx.array, num_rows: int) -> mx.array:
    """``out[m] = sum over (n, j) with indices[n, j] == m of weights[n, j] * rows[n]`` -> [num_rows, d].

    An fp32 scatter-add (``.at[].add``, which sums repeated indices) of the [chunk*k, d] products, chunked over
    tokens so no update tensor exceeds ~16M elements; the fp32 target [num_rows, d] must stay below 2**31."""
    out_dtype = _validate_scatter(weights, indices, rows, num_rows)
    n, k = indices.shape
    d = rows.shape[1]
    _check_size("scatter_outer output [num_rows, d]", num_rows * d)
    out = mx.zeros((num_rows, d), dtype=mx.float32)
    if n == 0 or k == 0 or d == 0 or num_rows == 0:
        return out.astype(out_dtype)
    for s, e in _token_chunks(n, k * d):
        w = weights[s:e].astype(mx.float32)[:, :, None]  # [c, k, 1]
        r = rows[s:e].astype(mx.float32)[:, None, :]  # [c, 1, d]
        out = out.at[indices[s:e].reshape(-1)].add((w * r).reshape(-1, d))
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Metal kernels: bodies (conservative MSL: scalar loads/stores, fp32 accumulators, integer loops, metal::simd_sum;
# no threadgroup memory, no atomics, no local pointers), specs and launch plans.
# Sizes come from the `<input>_shape` arguments MLX adds because the bodies mention them.
# ----------------------------------------------------------------------------------------------------------------

GATHER_WEIGHTED_SUM_SOURCE = """
    // out[n, c] = sum_j weights[n, j] * table[indices[n, j], c]; one thread per (c, n).
    const uint c = thread_position_in_grid.x;
    const uint n = thread_position_in_grid.y;
    const int N = weights_shape[0];
    const int K = weights_shape[1];
    const int M = table_shape[0];
    const int D = table_shape[1];
    if (c >= uint(D) || n >= uint(N)) {
        return;
    }
    const uint64_t slot0 = uint64_t(n) * uint64_t(K);
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) {
        const int64_t m = int64_t(indices[slot0 + uint64_t(j)]);
        if (m >= 0 && m < int64_t(M)) {
            acc += float(weights[slot0 + uint64_t(j)]) * float(table[uint64_t(m) * uint64_t(D) + uint64_t(c)]);
        }
    }
    out[uint64_t(n) * uint64_t(D) + uint64_t(c)] = static_cast<OutT>(acc);
"""

GATHER_DOT_SOURCE = """
    // out[n, j] = <rows[n], table[indices[n, j]]>; one 32-lane SIMD group per (j, n), lane = x.
    const uint lane = thread_position_in_threadgroup.x;
    const uint j = thread_position_in_grid.y;
    const uint n = thread_position_in_grid.z;
    const int N = rows_shape[0];
    const int D = rows_shape[1];
    const int M = table_shape[0];
    const int K = indices_shape[1];
    // (j, n) is the same for all 32 lanes of a SIMD group: this exit is uniform, every lane reaches simd_sum.
    if (j >= uint(K) || n >= uint(N)) {
        return;
    }
    const uint64_t slot = uint64_t(n) * uint64_t(K) + uint64_t(j);
    const int64_t m = int64_t(indices[slot]);
    float acc = 0.0f;
    if (m >= 0 && m < int64_t(M)) {
        const uint64_t xrow = uint64_t(n) * uint64_t(D);
        const uint64_t trow = uint64_t(m) * uint64_t(D);
        for (uint c = lane; c < uint(D); c += 32) {
            acc += float(rows[xrow + uint64_t(c)]) * float(table[trow + uint64_t(c)]);
        }
    }
    acc = metal::simd_sum(acc);
    if (lane == 0) {
        out[slot] = static_cast<OutT>(acc);
    }
"""

SCATTER_OUTER_SOURCE = """
    // out[m, c] = sum over the flat positions f = n * K + j listed in order[offsets[m] .. offsets[m + 1])
    // of weights[f] * rows[n, c]; one thread per (c, m), each output element written exactly once.
    const uint c = thread_position_in_grid.x;
    const uint m = thread_position_in_grid.y;
    const int K = weights_shape[1];
    const int D = rows_shape[1];
    const int M = offsets_shape[0] - 1;
    if (c >= uint(D) || m >= uint(M)) {
        return;
    }
    const int start = offsets[m];
    const int end = offsets[m + 1];
    float acc = 0.0f;
    for (int p = start; p < end; ++p) {
        const uint f = order[p];
        const uint n = f / uint(K);
        acc += float(weights[f]) * float(rows[uint64_t(n) * uint64_t(D) + uint64_t(c)]);
    }
    out[uint64_t(m) * uint64_t(D) + uint64_t(c)] = static_cast<OutT>(acc);
"""

# ---- speed variants (item 8 of issue 13): same results, selectable, the kernels above stay the default until a
# ---- Mac measures both (`python -m bench --mlx-variants ...` on Apple silicon).

GATHER_DOT_BLOCK = 4  # output slots j per SIMD group in the blocked gather_dot

GATHER_DOT_BLOCKED_SOURCE = """
    // One SIMD group per (token n, block of Block slots j): each lane reads rows[n, c] once per column and
    // multiplies it with the Block table rows, so x[n] is read K / Block times instead of K times.
    const uint lane = thread_position_in_threadgroup.x;
    const uint block = thread_position_in_grid.y;
    const uint n = thread_position_in_grid.z;
    const int N = rows_shape[0];
    const int D = rows_shape[1];
    const int M = table_shape[0];
    const int K = indices_shape[1];
    // (block, n) is the same for all 32 lanes of a SIMD group: this exit is uniform, every lane reaches simd_sum.
    if (block * uint(Block) >= uint(K) || n >= uint(N)) {
        return;
    }
    const uint64_t xrow = uint64_t(n) * uint64_t(D);
    uint64_t trow[Block];
    bool valid[Block];
    float acc[Block];
    for (int b = 0; b < Block; ++b) {
        const uint j = block * uint(Block) + uint(b);
        const int64_t m = j < uint(K) ? int64_t(indices[uint64_t(n) * uint64_t(K) + uint64_t(j)]) : int64_t(-1);
        valid[b] = m >= 0 && m < int64_t(M);
        trow[b] = valid[b] ? uint64_t(m) * uint64_t(D) : uint64_t(0);
        acc[b] = 0.0f;
    }
    for (uint c = lane; c < uint(D); c += 32) {
        const float x = float(rows[xrow + uint64_t(c)]);
        for (int b = 0; b < Block; ++b) {
            if (valid[b]) {
                acc[b] += x * float(table[trow[b] + uint64_t(c)]);
            }
        }
    }
    for (int b = 0; b < Block; ++b) {
        const float total = metal::simd_sum(acc[b]);
        const uint j = block * uint(Block) + uint(b);
        if (lane == 0 && j < uint(K)) {
            out[uint64_t(n) * uint64_t(K) + uint64_t(j)] = static_cast<OutT>(total);
        }
    }
"""

WIDE_COLUMNS = 4  # output columns per thread in the wide gather_weighted_sum / scatter_outer

GATHER_WEIGHTED_SUM_WIDE_SOURCE = """
    // out[n, c0 .. c0 + Cols) with c0 = Cols * x: each thread reads each slot's index and weight once for Cols
    // neighbouring columns, and the Cols table elements of a row side by side (MLX's own kernels read N_READS
    // elements per thread the same way).
    const uint c0 = thread_position_in_grid.x * uint(Cols);
    const uint n = thread_position_in_grid.y;
    const int N = weights_shape[0];
    const int K = weights_shape[1];
    const int M = table_shape[0];
    const int D = table_shape[1];
    if (c0 >= uint(D) || n >= uint(N)) {
        return;
    }
    const uint width = uint(D) - c0 < uint(Cols) ? uint(D) - c0 : uint(Cols);
    const uint64_t slot0 = uint64_t(n) * uint64_t(K);
    float acc[Cols];
    for (int b = 0; b < Cols; ++b) {
        acc[b] = 0.0f;
    }
    for (int j = 0; j < K; ++j) {
        const int64_t m = int64_t(indices[slot0 + uint64_t(j)]);
        if (m >= 0 && m < int64_t(M)) {
            const float w = float(weights[slot0 + uint64_t(j)]);
            const uint64_t trow = uint64_t(m) * uint64_t(D) + uint64_t(c0);
            for (uint b = 0; b < width; ++b) {
                acc[b] += w * float(table[trow + uint64_t(b)]);
            }
        }
    }
    const uint64_t orow = uint64_t(n) * uint64_t(D) + uint64_t(c0);
    for (uint b = 0; b < width; ++b) {
        out[orow + uint64_t(b)] = static_cast<OutT>(acc[b]);
    }
"""

SCATTER_OUTER_WIDE_SOURCE = """
    // out[m, c0 .. c0 + Cols) with c0 = Cols * x: as the serial scatter_outer, each thread reading each entry's
    // position and weight once for Cols neighbouring columns.
    const uint c0 = thread_position_in_grid.x * uint(Cols);
    const uint m = thread_position_in_grid.y;
    const int K = weights_shape[1];
    const int D = rows_shape[1];
    const int M = offsets_shape[0] - 1;
    if (c0 >= uint(D) || m >= uint(M)) {
        return;
    }
    const uint width = uint(D) - c0 < uint(Cols) ? uint(D) - c0 : uint(Cols);
    float acc[Cols];
    for (int b = 0; b < Cols; ++b) {
        acc[b] = 0.0f;
    }
    for (int p = offsets[m]; p < offsets[m + 1]; ++p) {
        const uint f = order[p];
        const float w = float(weights[f]);
        const uint64_t row = uint64_t(f / uint(K)) * uint64_t(D) + uint64_t(c0);
        for (uint b = 0; b < width; ++b) {
            acc[b] += w * float(rows[row + uint64_t(b)]);
        }
    }
    const uint64_t orow = uint64_t(m) * uint64_t(D) + uint64_t(c0);
    for (uint b = 0; b < width; ++b) {
        out[orow + uint64_t(b)] = static_cast<OutT>(acc[b]);
    }
"""

SCATTER_SEGMENT = 256  # entries per segment in the segmented scatter_outer

SCATTER_SEGMENT_PARTIAL_SOURCE = """
    // partial[s, c] = the sum over segment s: up to Segment consecutive entries of one latent's CSR range
    // (order[offsets[m] ..]); one thread per (c, s). Segments past the used ones write 0.
    const uint c = thread_position_in_grid.x;
    const uint s = thread_position_in_grid.y;
    const int K = weights_shape[1];
    const int D = rows_shape[1];
    const int M = offsets_shape[0] - 1;
    const int S = seg_latent_shape[0];
    if (c >= uint(D) || s >= uint(S)) {
        return;
    }
    float acc = 0.0f;
    if (int(s) < seg_offsets[M]) {
        const int m = seg_latent[s];
        const int first = offsets[m] + (int(s) - seg_offsets[m]) * Segment;
        const int stop = first + Segment < offsets[m + 1] ? first + Segment : offsets[m + 1];
        for (int p = first; p < stop; ++p) {
            const uint f = order[p];
            const uint n = f / uint(K);
            acc += float(weights[f]) * float(rows[uint64_t(n) * uint64_t(D) + uint64_t(c)]);
        }
    }
    partial[uint64_t(s) * uint64_t(D) + uint64_t(c)] = acc;
"""

SCATTER_SEGMENT_REDUCE_SOURCE = """
    // out[m, c] = the sum of latent m's segment partials partial[seg_offsets[m] .. seg_offsets[m + 1], c]
    const uint c = thread_position_in_grid.x;
    const uint m = thread_position_in_grid.y;
    const int D = partial_shape[1];
    const int M = seg_offsets_shape[0] - 1;
    if (c >= uint(D) || m >= uint(M)) {
        return;
    }
    float acc = 0.0f;
    for (int s = seg_offsets[m]; s < seg_offsets[m + 1]; ++s) {
        acc += partial[uint64_t(s) * uint64_t(D) + uint64_t(c)];
    }
    out[uint64_t(m) * uint64_t(D) + uint64_t(c)] = static_cast<OutT>(acc);
"""


@dataclass(frozen=True)
class MetalKernelSpec:
    """The static part of a ``mx.fast.metal_kernel``: what its constructor takes."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "source": self.source,
            "header": self.header,
            "ensure_row_contiguous": self.ensure_row_contiguous,
            "atomic_outputs": self.atomic_outputs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MetalKernelSpec":
        return cls(
            name=d["name"],
            input_names=tuple(d["input_names"]),
            output_names=tuple(d["output_names"]),
            source=d["source"],
            header=d.get("header", ""),
            ensure_row_contiguous=bool(d.get("ensure_row_contiguous", True)),
            atomic_outputs=bool(d.get("atomic_outputs", False)),
        )


GATHER_WEIGHTED_SUM_SPEC = MetalKernelSpec(
    name="sae_gather_weighted_sum",
    input_names=("weights", "indices", "table"),
    output_names=("out",),
    source=GATHER_WEIGHTED_SUM_SOURCE,
)
GATHER_DOT_SPEC = MetalKernelSpec(
    name="sae_gather_dot",
    input_names=("rows", "table", "indices"),
    output_names=("out",),
    source=GATHER_DOT_SOURCE,
)
SCATTER_OUTER_SPEC = MetalKernelSpec(
    name="sae_scatter_outer",
    input_names=("weights", "rows", "order", "offsets"),
    output_names=("out",),
    source=SCATTER_OUTER_SOURCE,
)
GATHER_DOT_BLOCKED_SPEC = MetalKernelSpec(
    name="sae_gather_dot_blocked",
    input_names=("rows", "table", "indices"),
    output_names=("out",),
    source=GATHER_DOT_BLOCKED_SOURCE,
)
SCATTER_SEGMENT_PARTIAL_SPEC = MetalKernelSpec(
    name="sae_scatter_segment_partial",
    input_names=("weights", "rows", "order", "offsets", "seg_offsets", "seg_latent"),
    output_names=("partial",),
    source=SCATTER_SEGMENT_PARTIAL_SOURCE,
)
SCATTER_SEGMENT_REDUCE_SPEC = MetalKernelSpec(
    name="sae_scatter_segment_reduce",
    input_names=("partial", "seg_offsets"),
    output_names=("out",),
    source=SCATTER_SEGMENT_REDUCE_SOURCE,
)
GATHER_WEIGHTED_SUM_WIDE_SPEC = MetalKernelSpec(
    name="sae_gather_weighted_sum_wide",
    input_names=("weights", "indices", "table"),
    output_names=("out",),
    source=GATHER_WEIGHTED_SUM_WIDE_SOURCE,
)
SCATTER_OUTER_WIDE_SPEC = MetalKernelSpec(
    name="sae_scatter_outer_wide",
    input_names=("weights", "rows", "order", "offsets"),
    output_names=("out",),
    source=SCATTER_OUTER_WIDE_SOURCE,
)
KERNEL_SPECS = {s.name: s for s in (GATHER_WEIGHTED_SUM_SPEC, GATHER_DOT_SPEC, SCATTER_OUTER_SPEC,
                                    GATHER_DOT_BLOCKED_SPEC, SCATTER_SEGMENT_PARTIAL_SPEC,
                                    SCATTER_SEGMENT_REDUCE_SPEC, GATHER_WEIGHTED_SUM_WIDE_SPEC,
                                    SCATTER_OUTER_WIDE_SPEC)}


@functools.lru_cache(maxsize=None)
def _metal_kernel(spec: MetalKernelSpec):
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=spec.ensure_row_contiguous,
        atomic_outputs=spec.atomic_outputs,
    )


def _dtype_name(dt: mx.Dtype) -> str:
    return str(dt).rsplit(".", 1)[-1]


def _dtype_from_name(name: str) -> mx.Dtype:
    dt = getattr(mx, name, None)
    if not isinstance(dt, mx.Dtype):
        raise ValueError(f"unknown MLX dtype name {name!r}")
    return dt


@dataclass
class MetalLaunch:
    """Everything one ``mx.fast.metal_kernel`` call takes. :meth:`run` is the only place a kernel of this module
    is called; the Linux harness builds the same call from :meth:`describe`."""

    spec: MetalKernelSpec
    inputs: list
    template: list = field(default_factory=list)  # [(name, mx.Dtype | int | bool)]
    grid: tuple = (1, 1, 1)
    threadgroup: tuple = (1, 1, 1)
    output_shapes: list = field(default_factory=list)
    output_dtypes: list = field(default_factory=list)
    init_value: float | None = None

    def call_kwargs(self, verbose: bool = False) -> dict:
        kw = dict(
            inputs=list(self.inputs),
            template=list(self.template),
            grid=tuple(int(g) for g in self.grid),
            threadgroup=tuple(int(t) for t in self.threadgroup),
            output_shapes=[tuple(int(s) for s in shp) for shp in self.output_shapes],
            output_dtypes=list(self.output_dtypes),
            init_value=self.init_value,
        )
        if verbose:
            kw["verbose"] = True
        return kw

    def run(self, verbose: bool = False) -> list[mx.array]:
        return _metal_kernel(self.spec)(**self.call_kwargs(verbose=verbose))

    def with_inputs(self, inputs: Sequence[mx.array]) -> "MetalLaunch":
        return replace(self, inputs=list(inputs))

    def describe(self) -> dict:
        """A JSON-able description (no array values): the spec, input shapes/dtypes and launch parameters."""
        template = []
        for name, value in self.template:
            if isinstance(value, mx.Dtype):
                template.append([name, "dtype", _dtype_name(value)])
            elif isinstance(value, bool):
                template.append([name, "bool", value])
            elif isinstance(value, int):
                template.append([name, "int", value])
            else:
                raise TypeError(f"template arg {name!r} must be an mlx dtype, bool or int, got {value!r}")
        return {
            "spec": self.spec.as_dict(),
            "inputs": [{"shape": [int(s) for s in a.shape], "dtype": _dtype_name(a.dtype)} for a in self.inputs],
            "template": template,
            "grid": [int(g) for g in self.grid],
            "threadgroup": [int(t) for t in self.threadgroup],
            "output_shapes": [[int(s) for s in shp] for shp in self.output_shapes],
            "output_dtypes": [_dtype_name(dt) for dt in self.output_dtypes],
            "init_value": self.init_value,
        }

    @classmethod
    def from_description(cls, d: dict) -> "MetalLaunch":
        """Inverse of :meth:`describe`, with zero-filled inputs of the recorded shapes and dtypes."""
        template = []
        for name, kind, value in d["template"]:
            if kind == "dtype":
                template.append((name, _dtype_from_name(value)))
            else:
                template.append((name, bool(value) if kind == "bool" else int(value)))
        return cls(
            spec=MetalKernelSpec.from_dict(d["spec"]),
            inputs=[mx.zeros(tuple(a["shape"]), dtype=_dtype_from_name(a["dtype"])) for a in d["inputs"]],
            template=template,
            grid=tuple(d["grid"]),
            threadgroup=tuple(d["threadgroup"]),
            output_shapes=[tuple(s) for s in d["output_shapes"]],
            output_dtypes=[_dtype_from_name(x) for x in d["output_dtypes"]],
            init_value=d.get("init_value"),
        )


_MAX_GROUP = 256  # threads per threadgroup in our launches (Metal allows up to 1024; 256 is safe for any kernel)


def _row_threadgroup(width: int, rows: int) -> tuple[int, int, int]:
    """Threadgroup for a (width, rows) grid of one-thread-per-element kernels: up to 256 threads, as many whole
    rows as fit. MLX clamps each dimension to the grid, so a narrow width gives a narrower group."""
    tx = min(max(1, width), _MAX_GROUP)
    ty = max(1, min(max(1, rows), _MAX_GROUP // tx))
    return (tx, ty, 1)


def plan_gather_weighted_sum(weights: mx.array, indices: mx.array, table: mx.array) -> MetalLaunch:
    """The Metal launch of ``gather_weighted_sum`` (inputs must be non-empty: N, k, d > 0); the wide kernel
    (WIDE_COLUMNS columns per thread) with SAE_MLX_GWS=wide."""
    out_dtype = _validate_gws(weights, indices, table)
    n, _ = indices.shape
    d = table.shape[1]
    if kernel_variant(GWS_ENV) == "wide":
        width = -(-d // WIDE_COLUMNS)
        return MetalLaunch(
            spec=GATHER_WEIGHTED_SUM_WIDE_SPEC,
            inputs=[weights, indices, table],
            template=[("OutT", out_dtype), ("Cols", WIDE_COLUMNS)],
            grid=(width, n, 1),
            threadgroup=_row_threadgroup(width, n),
            output_shapes=[(n, d)],
            output_dtypes=[out_dtype],
        )
    return MetalLaunch(
        spec=GATHER_WEIGHTED_SUM_SPEC,
        inputs=[weights, indices, table],
        template=[("OutT", out_dtype)],
        grid=(d, n, 1),
        threadgroup=_row_threadgroup(d, n),
        output_shapes=[(n, d)],
        output_dtypes=[out_dtype],
    )


def plan_gather_dot(rows: mx.array, table: mx.array, indices: mx.array) -> MetalLaunch:
    """The Metal launch of ``gather_dot`` (inputs must be non-empty: N, k > 0); the blocked kernel with
    SAE_MLX_GATHER_DOT=blocked."""
    out_dtype = _validate_gdot(rows, table, indices)
    n, k = indices.shape
    if kernel_variant(GATHER_DOT_ENV) == "blocked":
        blocks = -(-k // GATHER_DOT_BLOCK)
        ty = min(blocks, 8)
        return MetalLaunch(
            spec=GATHER_DOT_BLOCKED_SPEC,
            inputs=[rows, table, indices],
            template=[("OutT", out_dtype), ("Block", GATHER_DOT_BLOCK)],
            grid=(32, blocks, n),
            threadgroup=(32, ty, max(1, min(n, 8 // ty))),
            output_shapes=[(n, k)],
            output_dtypes=[out_dtype],
        )
    ty = min(k, 8)
    tz = max(1, min(n, 8 // ty))
    return MetalLaunch(
        spec=GATHER_DOT_SPEC,
        inputs=[rows, table, indices],
        template=[("OutT", out_dtype)],
        grid=(32, k, n),
        threadgroup=(32, ty, tz),
        output_shapes=[(n, k)],
        output_dtypes=[out_dtype],
    )


def latent_csr(indices: mx.array, num_rows: int) -> tuple[mx.array, mx.array]:
    """(order [N*k] uint32, offsets [num_rows + 1] int32): ``order[offsets[m]:offsets[m+1]]`` are the flat
    positions n*k + j with indices[n, j] == m. Out-of-range indices get the key num_rows: they sort last and no
    latent's range covers them, so the kernel never reads them. scatter_outer's Metal path needs it; a caller that
    scatters twice with the same indices (the decoder and the encoder weight gradients of one selection) builds
    it once and passes it as ``csr``."""
    flat = indices.reshape(-1)
    valid = (flat >= 0) & (flat < num_rows)
    keys = mx.where(valid, flat, num_rows).astype(mx.int32)
    order = mx.argsort(keys).astype(mx.uint32)
    counts = mx.zeros((num_rows + 1,), dtype=mx.int32).at[keys].add(mx.ones(keys.shape, dtype=mx.int32))
    offsets = mx.concatenate([mx.zeros((1,), dtype=mx.int32), mx.cumsum(counts[:num_rows])])
    return order, offsets


_csr_by_latent = latent_csr


def _segments(offsets: mx.array, num_entries: int, num_rows: int) -> tuple[mx.array, mx.array]:
    """(seg_offsets [num_rows + 1] int32, seg_latent [S] int32) cutting each latent's CSR range into segments of at
    most SCATTER_SEGMENT entries: latent m owns segments seg_offsets[m] .. seg_offsets[m + 1], segment s belongs
    to latent seg_latent[s]. S = min(num_rows, entries) + ceil(entries / SCATTER_SEGMENT) bounds the count
    without a host sync (each latent has at most one partial segment); segments past seg_offsets[-1] are unused."""
    counts = offsets[1:] - offsets[:-1]
    per_latent = (counts + SCATTER_SEGMENT - 1) // SCATTER_SEGMENT
    seg_offsets = mx.concatenate([mx.zeros((1,), dtype=mx.int32), mx.cumsum(per_latent).astype(mx.int32)])
    bound = min(num_rows, num_entries) + -(-num_entries // SCATTER_SEGMENT)
    # each latent's first segment gets its number; latents without segments share the next one's start and lose
    # to it under maximum; a running maximum fills the rest. One spare slot takes the starts at the very end.
    firsts = mx.zeros((bound + 1,), dtype=mx.int32).at[seg_offsets[:-1]].maximum(
        mx.arange(num_rows, dtype=mx.int32))
    return seg_offsets, mx.cummax(firsts)[:bound]


def plan_scatter_outer_segmented(weights: mx.array, indices: mx.array, rows: mx.array, num_rows: int,
                                 csr: tuple[mx.array, mx.array] | None = None) -> list[MetalLaunch]:
    """The two launches of the segmented ``scatter_outer`` (SAE_MLX_SCATTER=segmented): fp32 partial sums over
    segments of at most SCATTER_SEGMENT entries, then one sum of its segments per latent. A latent that fires on
    most tokens is then spread over many threads instead of one serial loop over all its entries. The second
    launch's ``partial`` input is a placeholder of the right shape: :func:`scatter_outer_metal` feeds it the
    first launch's output."""
    out_dtype = _validate_scatter(weights, indices, rows, num_rows)
    n, k = indices.shape
    d = rows.shape[1]
    _check_size("scatter_outer's flat (token, slot) positions N*k", n * k)
    _check_size("scatter_outer num_rows + 1", num_rows + 1)
    order, offsets = latent_csr(indices, num_rows) if csr is None else csr
    seg_offsets, seg_latent = _segments(offsets, n * k, num_rows)
    segments = seg_latent.shape[0]
    _check_size("segmented scatter_outer partial sums [S, d]", segments * d)
    partial = MetalLaunch(
        spec=SCATTER_SEGMENT_PARTIAL_SPEC,
        inputs=[weights, rows, order, offsets, seg_offsets, seg_latent],
        template=[("Segment", SCATTER_SEGMENT)],
        grid=(d, segments, 1),
        threadgroup=_row_threadgroup(d, segments),
        output_shapes=[(segments, d)],
        output_dtypes=[mx.float32],
    )
    reduce = MetalLaunch(
        spec=SCATTER_SEGMENT_REDUCE_SPEC,
        inputs=[mx.zeros((segments, d), dtype=mx.float32), seg_offsets],
        template=[("OutT", out_dtype)],
        grid=(d, num_rows, 1),
        threadgroup=_row_threadgroup(d, num_rows),
        output_shapes=[(num_rows, d)],
        output_dtypes=[out_dtype],
    )
    return [partial, reduce]


def plan_scatter_outer(weights: mx.array, indices: mx.array, rows: mx.array, num_rows: int,
                       csr: tuple[mx.array, mx.array] | None = None) -> MetalLaunch:
    """The Metal launch of ``scatter_outer`` (inputs must be non-empty: N, k, d, num_rows > 0). Builds the
    per-latent CSR layout with MLX ops (argsort + counts + cumsum) first."""
    out_dtype = _validate_scatter(weights, indices, rows, num_rows)
    n, k = indices.shape
    d = rows.shape[1]
    _check_size("scatter_outer's flat (token, slot) positions N*k", n * k)
    _check_size("scatter_outer num_rows + 1", num_rows + 1)
    order, offsets = latent_csr(indices, num_rows) if csr is None else csr
    if kernel_variant(SCATTER_ENV) == "wide":
        width = -(-d // WIDE_COLUMNS)
        return MetalLaunch(
            spec=SCATTER_OUTER_WIDE_SPEC,
            inputs=[weights, rows, order, offsets],
            template=[("OutT", out_dtype), ("Cols", WIDE_COLUMNS)],
            grid=(width, num_rows, 1),
            threadgroup=_row_threadgroup(width, num_rows),
            output_shapes=[(num_rows, d)],
            output_dtypes=[out_dtype],
        )
    return MetalLaunch(
        spec=SCATTER_OUTER_SPEC,
        inputs=[weights, rows, order, offsets],
        template=[("OutT", out_dtype)],
        grid=(d, num_rows, 1),
        threadgroup=_row_threadgroup(d, num_rows),
        output_shapes=[(num_rows, d)],
        output_dtypes=[out_dtype],
    )


def gather_weighted_sum_metal(weights: mx.array, indices: mx.array, table: mx.array) -> mx.array:
    """Metal kernel for ``gather_weighted_sum`` (needs Apple-silicon Metal)."""
    out_dtype = _validate_gws(weights, indices, table)
    n, k = indices.shape
    d = table.shape[1]
    if n == 0 or k == 0 or d == 0:
        return mx.zeros((n, d), dtype=out_dtype)
    return plan_gather_weighted_sum(weights, indices, table).run()[0]


def gather_dot_metal(rows: mx.array, table: mx.array, indices: mx.array) -> mx.array:
    """Metal kernel for ``gather_dot`` (needs Apple-silicon Metal)."""
    out_dtype = _validate_gdot(rows, table, indices)
    n, k = indices.shape
    if n == 0 or k == 0 or rows.shape[1] == 0:
        return mx.zeros((n, k), dtype=out_dtype)
    return plan_gather_dot(rows, table, indices).run()[0]


def scatter_outer_metal(weights: mx.array, indices: mx.array, rows: mx.array, num_rows: int,
                        csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """Metal kernel for ``scatter_outer`` (needs Apple-silicon Metal); ``csr``: ``latent_csr(indices, num_rows)``
    if the caller has it already."""
    out_dtype = _validate_scatter(weights, indices, rows, num_rows)
    n, k = indices.shape
    d = rows.shape[1]
    if n == 0 or k == 0 or d == 0 or num_rows == 0:
        return mx.zeros((num_rows, d), dtype=out_dtype)
    if kernel_variant(SCATTER_ENV) == "segmented":
        partial, reduce = plan_scatter_outer_segmented(weights, indices, rows, num_rows, csr)
        (sums,) = partial.run()
        return reduce.with_inputs([sums, reduce.inputs[1]]).run()[0]
    return plan_scatter_outer(weights, indices, rows, num_rows, csr).run()[0]


# ----------------------------------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------------------------------


def gather_weighted_sum(weights: mx.array, indices: mx.array, table: mx.array) -> mx.array:
    """``out[n] = sum_j weights[n, j] * table[indices[n, j]]`` -> [N, d]; Metal when available, else the
    reference."""
    if use_metal():
        return gather_weighted_sum_metal(weights, indices, table)
    return gather_weighted_sum_reference(weights, indices, table)


def gather_dot(rows: mx.array, table: mx.array, indices: mx.array) -> mx.array:
    """``out[n, j] = <rows[n], table[indices[n, j]]>`` -> [N, k]; Metal when available, else the reference."""
    if use_metal():
        return gather_dot_metal(rows, table, indices)
    return gather_dot_reference(rows, table, indices)


def scatter_outer(weights: mx.array, indices: mx.array, rows: mx.array, num_rows: int,
                  csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """``out[m] = sum_{indices[n, j] == m} weights[n, j] * rows[n]`` -> [num_rows, d]; Metal when available, else
    the reference. ``csr``: ``latent_csr(indices, num_rows)`` if the caller has it (the Metal path then skips
    building it; the reference does not use it)."""
    if use_metal():
        return scatter_outer_metal(weights, indices, rows, num_rows, csr)
    return scatter_outer_reference(weights, indices, rows, num_rows)


# ----------------------------------------------------------------------------------------------------------------
# Differentiable wrappers
# ----------------------------------------------------------------------------------------------------------------


def _single(cotangent):
    return cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent


def sparse_decode(acts: mx.array, indices: mx.array, weight: mx.array,
                  csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """Differentiable ``sum_j acts[:, j] * weight[indices[:, j]]`` -> [N, d] (no bias); gradients w.r.t. ``acts``
    [N, k] and ``weight`` [M, d] (``indices`` get zeros). ``csr``: ``latent_csr(indices, M)``, shared with the
    other sparse wrapper of the same selection so the weight gradients build it once."""
    if csr is None:
        return _sparse_decode(acts, indices, weight)
    return _sparse_decode_csr(acts, indices, weight, *csr)


def _decode_vjp(acts, indices, weight, cotangent, csr=None):
    cot = _single(cotangent)
    d_acts = gather_dot(cot, weight, indices).astype(acts.dtype)
    d_weight = scatter_outer(acts, indices, cot, weight.shape[0], csr).astype(weight.dtype)
    return d_acts, mx.zeros_like(indices), d_weight


@mx.custom_function
def _sparse_decode(acts: mx.array, indices: mx.array, weight: mx.array) -> mx.array:
    return gather_weighted_sum(acts, indices, weight)


@_sparse_decode.vjp
def _sparse_decode_vjp(primals, cotangent, output):
    return _decode_vjp(*primals, cotangent)


@mx.custom_function
def _sparse_decode_csr(acts, indices, weight, order, offsets) -> mx.array:
    return gather_weighted_sum(acts, indices, weight)


@_sparse_decode_csr.vjp
def _sparse_decode_csr_vjp(primals, cotangent, output):
    acts, indices, weight, order, offsets = primals
    return (*_decode_vjp(acts, indices, weight, cotangent, (order, offsets)), mx.zeros_like(order),
            mx.zeros_like(offsets))


def sparse_encode(x: mx.array, weight: mx.array, indices: mx.array, values: mx.array | None = None,
                  csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """Differentiable ``<x[n], weight[indices[n, j]]>`` -> [N, k] (the selected pre-activations, no bias);
    gradients w.r.t. ``x`` [N, d] and ``weight`` [M, d] (``indices`` get zeros). ``values``: those numbers if
    already computed (gathered from a dense pre-activation matmul); then only the vjp runs sparse kernels.
    ``csr`` (with ``values``): ``latent_csr(indices, M)``, as for :func:`sparse_decode`."""
    if values is None:
        return _sparse_encode(x, weight, indices)
    if csr is None:
        return _sparse_encode_given(x, weight, indices, mx.stop_gradient(values))
    return _sparse_encode_given_csr(x, weight, indices, mx.stop_gradient(values), *csr)


def _encode_vjp(x, weight, indices, cotangent, csr=None):
    cot = _single(cotangent)
    d_x = gather_weighted_sum(cot, indices, weight).astype(x.dtype)
    d_weight = scatter_outer(cot, indices, x, weight.shape[0], csr).astype(weight.dtype)
    return d_x, d_weight, mx.zeros_like(indices)


@mx.custom_function
def _sparse_encode(x: mx.array, weight: mx.array, indices: mx.array) -> mx.array:
    return gather_dot(x, weight, indices)


@_sparse_encode.vjp
def _sparse_encode_vjp(primals, cotangent, output):
    return _encode_vjp(*primals, cotangent)


@mx.custom_function
def _sparse_encode_given(x: mx.array, weight: mx.array, indices: mx.array, values: mx.array) -> mx.array:
    return values


@_sparse_encode_given.vjp
def _sparse_encode_given_vjp(primals, cotangent, output):
    x, weight, indices, values = primals
    return (*_encode_vjp(x, weight, indices, cotangent), mx.zeros_like(values))


@mx.custom_function
def _sparse_encode_given_csr(x, weight, indices, values, order, offsets) -> mx.array:
    return values


@_sparse_encode_given_csr.vjp
def _sparse_encode_given_csr_vjp(primals, cotangent, output):
    x, weight, indices, values, order, offsets = primals
    return (*_encode_vjp(x, weight, indices, cotangent, (order, offsets)), mx.zeros_like(values),
            mx.zeros_like(order), mx.zeros_like(offsets))
