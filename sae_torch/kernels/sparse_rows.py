"""Sparse row kernels for TopK SAEs: gather / weighted-sum / scatter over rows of a [M, d] table.

Three primitives, each with a pure-torch reference (``*_reference``, the eager path on CPU, MPS or whenever
``SAE_EAGER`` is set) and a Triton version (``*_triton``), plus a dispatcher with the plain name:

Design notes: docs/internals.md, section `sae_torch/kernels/sparse_rows.py`.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# triton is optional and imported lazily: this module imports (and the references work) without it, and importing
# it does not import triton (so a process can still set TRITON_INTERPRET=1 before triton's first import).
try:
    HAS_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):  # pragma: no cover
    HAS_TRITON = False
triton = None  # the modules, once _import_triton() ran
tl = None

__all__ = [
    "HAS_TRITON",
    "use_triton",
    "gather_weighted_sum",
    "gather_weighted_sum_reference",
    "gather_weighted_sum_triton",
    "gather_dot",
    "gather_dot_reference",
    "gather_dot_triton",
    "scatter_outer",
    "scatter_outer_reference",
    "scatter_outer_triton",
    "SCATTER_KERNELS",
    "SparseDecode",
    "sparse_decode",
    "SparseEncode",
    "sparse_encode",
]

_INDEX_DTYPES = (torch.int32, torch.int64)

# Upper bound on the number of elements of the per-chunk temporary in gather_dot_reference.
_REF_CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Dispatch helpers
# ----------------------------------------------------------------------------------------------------------------


def _eager_forced() -> bool:
    return os.environ.get("SAE_EAGER", "") not in ("", "0")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels should be used for ``tensor``: it is on CUDA, triton is installed, and the
    environment variable ``SAE_EAGER`` is unset, empty or "0".

    Opt-in for checking the Triton path on a machine without GPU: with ``SAE_TRITON_CPU=1`` *and*
    ``TRITON_INTERPRET=1``, CPU tensors use the Triton kernels too (in triton's interpreter; slow)."""
    if not HAS_TRITON or _eager_forced():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and _env_flag("SAE_TRITON_CPU") and _env_flag("TRITON_INTERPRET")


def _import_triton():
    """Import triton (once) into this module's globals ``triton`` and ``tl``, which the kernels use."""
    global triton, tl, HAS_TRITON
    if triton is None:
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed; use the *_reference functions")
        try:
            import triton as _triton
            import triton.language as _tl
        except Exception as exc:  # installed but broken
            HAS_TRITON = False
            raise RuntimeError(
                f"triton is installed but does not import ({exc!r}); use the *_reference functions"
            ) from exc
        triton, tl = _triton, _tl
    return triton


def _interpreting() -> bool:
    """Whether triton runs (or, once imported, will run) kernels decorated now in its CPU interpreter."""
    if not HAS_TRITON:
        return False
    t = _import_triton()
    knobs = getattr(t, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return _env_flag("TRITON_INTERPRET")  # pragma: no cover - older triton


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_indices(indices: torch.Tensor) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D [N, k], got shape {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")


def _check_device(*named: tuple[str, torch.Tensor]) -> None:
    dev = named[0][1].device
    for name, t in named[1:]:
        if t.device != dev:
            raise ValueError(f"{named[0][0]} is on {dev} but {name} is on {t.device}")


def _validate_gws(weights, indices, table) -> None:
    _check_float("weights", weights)
    _check_indices(indices)
    _check_float("table", table)
    if weights.shape != indices.shape:
        raise ValueError(
            f"weights and indices must have the same shape [N, k], got {tuple(weights.shape)} and "
            f"{tuple(indices.shape)}"
        )
    _check_device(("weights", weights), ("indices", indices), ("table", table))


def _validate_gdot(rows, table, indices) -> None:
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
    _check_device(("rows", rows), ("table", table), ("indices", indices))


def _validate_scatter(weights, indices, rows, num_rows) -> None:
    _check_float("weights", weights)
    _check_indices(indices)
    _check_float("rows", rows)
    if weights.shape != indices.shape:
        raise ValueError(
            f"weights and indices must have the same shape [N, k], got {tuple(weights.shape)} and "
            f"{tuple(indices.shape)}"
        )
    if rows.shape[0] != indices.shape[0]:
        raise ValueError(
            f"rows [N, d] and indices [N, k] disagree on N: {tuple(rows.shape)} vs {tuple(indices.shape)}"
        )
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    _check_device(("weights", weights), ("indices", indices), ("rows", rows))


# ----------------------------------------------------------------------------------------------------------------
# References (pure torch; memory-light; fp32 accumulation)
# ----------------------------------------------------------------------------------------------------------------


def gather_weighted_sum_reference(
    weights: torch.Tensor, indices: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """``out[n] = sum_j weights[n, j] * table[indices[n, j]]`` via ``F.embedding_bag(mode="sum")``.

    embedding_bag accumulates reduced-precision inputs in fp32 (CPU and CUDA) and rounds once at the end, and it
    never materialises the [N, k, d] gather. Mixed dtypes are brought to the output dtype first (that cast is
    exact whenever it widens, which is the only case result_type produces for float pairs besides equal dtypes).
    """
    _validate_gws(weights, indices, table)
    out_dtype = torch.result_type(weights, table)
    n, _ = indices.shape
    d = table.shape[1]
    if n == 0 or d == 0 or indices.shape[1] == 0:
        return torch.zeros(n, d, dtype=out_dtype, device=table.device)
    return F.embedding_bag(
        indices.contiguous(),
        table.to(out_dtype).contiguous(),
        per_sample_weights=weights.to(out_dtype).contiguous(),
        mode="sum",
    )


def gather_dot_reference(rows: torch.Tensor, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``out[n, j] = <rows[n], table[indices[n, j]]>``.

    fp32/float64: aten's fused embedding_bag per-sample-weights backward (no gathered copy; 3-12x faster on CPU
    than a gather + bmm, measured by bench/). Other dtypes: in chunks of tokens so that the gathered [chunk, k, d]
    temporary stays below ~4M elements, each chunk upcast to fp32 and reduced with bmm."""
    _validate_gdot(rows, table, indices)
    out_dtype = torch.result_type(rows, table)
    acc = _acc_dtype(out_dtype)
    n, k = indices.shape
    d = rows.shape[1]
    out = torch.empty(n, k, dtype=out_dtype, device=rows.device)
    if n == 0 or k == 0:
        return out
    if d == 0:
        return out.zero_()
    idx = indices.long()
    if out_dtype == acc and table.shape[0] > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= table.shape[0]:
            raise IndexError(f"gather_dot: indices must lie in [0, {table.shape[0]}), got range [{lo}, {hi}]")
        offsets = torch.arange(0, n * k, k, device=rows.device)
        offset2bag = torch.arange(n, device=rows.device).repeat_interleave(k)
        flat = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows.to(acc).contiguous(), table.to(acc).contiguous(), idx.reshape(-1), offsets, offset2bag, 0, -1)
        return flat.view(n, k)
    chunk = max(1, _REF_CHUNK_ELEMS // max(1, k * d))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        g = table[idx[s:e]].to(acc)  # [c, k, d]
        r = rows[s:e].to(acc).unsqueeze(-1)  # [c, d, 1]
        out[s:e] = torch.bmm(g, r).squeeze(-1).to(out_dtype)
    return out


def _csr_by_latent(indices: torch.Tensor, num_rows: int):
    """Sort the flattened indices (stable) and return (sorted values, order, CSR row offsets [num_rows + 1]).

    ``order[p]`` is the flat position (n * k + j) of the p-th occurrence in latent order; the occurrences of latent
    ``m`` are ``order[offsets[m]:offsets[m + 1]]``, in increasing token order (the Triton scatter_outer's layout)."""
    flat = indices.reshape(-1)
    sorted_vals, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_rows + 1, dtype=sorted_vals.dtype, device=flat.device)
    offsets = torch.searchsorted(sorted_vals, bounds)  # int64: number of entries < m
    return sorted_vals, order, offsets


def scatter_outer_reference(
    weights: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """``out[m] = sum over (n, j) with indices[n, j] == m of weights[n, j] * rows[n]``.

    Per-latent reduction through aten's embedding_bag dense backward (``_embedding_bag_dense_backward``, mode sum
    with per-sample weights: it sorts the N*k indices and sums each latent's rows), in fp32 (float64 for float64
    inputs). Chosen because it beat the CSR/COO sparse-matrix products it replaced at the densities this function
    sees (COO wins only where the coder takes `subset_decode` instead); the timings are in bench/README.md, "What
    changed in this session's kernels". Memory: O(N*k) indices, O(N*d) for the fp32 copy of rows,
    O(num_rows*d) for the output; never an N*k*d or N*num_rows temporary.
    """
    _validate_scatter(weights, indices, rows, num_rows)
    out_dtype = torch.result_type(weights, rows)
    acc = _acc_dtype(out_dtype)
    n, k = indices.shape
    d = rows.shape[1]
    if n == 0 or k == 0 or d == 0 or num_rows == 0:
        if n * k > 0 and num_rows == 0:
            raise ValueError("scatter_outer: num_rows is 0 but indices are not empty")
        return torch.zeros(num_rows, d, dtype=out_dtype, device=rows.device)
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_rows:
        raise IndexError(f"scatter_outer: indices must lie in [0, {num_rows}), got range [{lo}, {hi}]")
    offset2bag = torch.arange(n, device=rows.device).repeat_interleave(k)
    bag_size = torch.full((n,), k, dtype=torch.long, device=rows.device)
    no_max_indices = torch.empty(0, dtype=torch.long, device=rows.device)
    out = torch.ops.aten._embedding_bag_dense_backward(
        rows.to(acc).contiguous(), indices.reshape(-1).long(), offset2bag, bag_size, no_max_indices, num_rows,
        False, 0, weights.reshape(-1).to(acc).contiguous(), -1)  # no freq scaling, mode sum, no padding index
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions here; wrapped with triton.jit lazily, see _kernels())
# ----------------------------------------------------------------------------------------------------------------

# The kernel bodies use the module globals `tl` / `triton`, bound by _import_triton() before they are jitted; their
# `tl.constexpr` annotations stay unevaluated strings (from __future__ import annotations), which triton accepts.


def _gws_kernel(
    w_ptr,  # [N, K] weights
    idx_ptr,  # [N, K] int32/int64
    table_ptr,  # [M, D]
    out_ptr,  # [N, D]
    K,
    D,
    M,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program = one token row n x one BLOCK_D slice of d. Loads [BLOCK_K, BLOCK_D] tiles of table rows:
    # each gathered row slice is contiguous (coalesced along d).
    n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(w_ptr + n * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        ok = mask_k & (idx >= 0) & (idx < M)
        t = tl.load(
            table_ptr + idx[:, None] * D + offs_d[None, :],
            mask=ok[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(t * w[:, None], axis=0)
    tl.store(out_ptr + n * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def _gdot_kernel(
    rows_ptr,  # [N, D]
    table_ptr,  # [M, D]
    idx_ptr,  # [N, K]
    out_ptr,  # [N, K]
    K,
    D,
    M,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program = one token row n x BLOCK_K of its k indices; loops over d in BLOCK_D slices, each a
    # [BLOCK_K, BLOCK_D] tile of gathered table rows (coalesced along d) times the row slice.
    n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    ok = mask_k & (idx >= 0) & (idx < M)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        r = tl.load(rows_ptr + n * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        t = tl.load(
            table_ptr + idx[:, None] * D + offs_d[None, :],
            mask=ok[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(t * r[None, :], axis=1)
    tl.store(out_ptr + n * K + offs_k, acc.to(out_ptr.dtype.element_ty), mask=mask_k)


def _scatter_kernel(
    w_ptr,  # [N*K] weights, flat
    order_ptr,  # [N*K] int64: flat positions sorted by latent (stable)
    offsets_ptr,  # [M+1] int64: CSR offsets of each latent in `order`
    item_latent_ptr,  # [W] int64: latent of each work item (M for padding items)
    seg_first_ptr,  # [M] int64: first work item of each latent
    heavy_rank_ptr,  # [M] int64: row in heavy_buf of a heavy latent (latent with > SEG occurrences)
    heavy_map_ptr,  # [H] int64: latent of each heavy_buf row (-1 = unused)
    heavy_buf_ptr,  # [H, D] fp32, zero-initialised: atomic accumulation of heavy latents
    rows_ptr,  # [N, D]
    out_ptr,  # [M, D]
    K,
    D,
    M,
    SEG: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program = one work item (a segment of <= SEG occurrences of one latent) x one BLOCK_D slice.
    # It loops over its occurrences in chunks of BLOCK_P: loads the chunk's flat positions, weights
    # (w[pos]) and token rows rows[pos // K, d-slice] as a [BLOCK_P, BLOCK_D] tile (coalesced along d),
    # and reduces over the chunk into an fp32 [BLOCK_D] accumulator.
    # Light latents (one segment; the common case) store straight into out, in out's dtype: no zero-init,
    # no atomics. Heavy latents are split over several programs (load balance) that atomic_add into a small
    # fp32 buffer, copied into out by _scatter_finalize_kernel.
    item = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    m = tl.load(item_latent_ptr + item)
    valid = m < M
    m_safe = tl.where(valid, m, 0)
    lat_start = tl.load(offsets_ptr + m_safe)
    lat_end = tl.load(offsets_ptr + m_safe + 1)
    seg = item - tl.load(seg_first_ptr + m_safe)
    start = lat_start + seg * SEG
    end = tl.minimum(lat_end, start + SEG)
    end = tl.where(valid, end, start)

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        pos = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
        w = tl.load(w_ptr + pos, mask=mask_p, other=0.0).to(tl.float32)
        tok = pos // K
        r = tl.load(
            rows_ptr + tok[:, None] * D + offs_d[None, :],
            mask=mask_p[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(r * w[:, None], axis=0)

    light = valid & ((lat_end - lat_start) <= SEG)
    tl.store(out_ptr + m_safe * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d & light)
    is_heavy = valid & ((lat_end - lat_start) > SEG)
    rank = tl.load(heavy_rank_ptr + m_safe)
    rank = tl.where(is_heavy, rank, 0)
    tl.atomic_add(heavy_buf_ptr + rank * D + offs_d, acc, mask=mask_d & is_heavy)
    tl.store(heavy_map_ptr + rank, m_safe, mask=is_heavy & (seg == 0) & (pid_d == 0))


def _scatter_finalize_kernel(
    heavy_map_ptr,  # [H] int64
    heavy_buf_ptr,  # [H, D] fp32
    out_ptr,  # [M, D]
    D,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.load(heavy_map_ptr + h)
    used = m >= 0
    m_safe = tl.where(used, m, 0)
    v = tl.load(heavy_buf_ptr + h * D + offs_d, mask=mask_d, other=0.0)
    tl.store(out_ptr + m_safe * D + offs_d, v.to(out_ptr.dtype.element_ty), mask=mask_d & used)


def _scatter_dot_kernel(
    w_ptr,  # [N*K] weights, flat
    order_ptr,  # [N*K] int64: flat positions sorted by latent (stable)
    lat_ptr,  # [N*K] the latents in that order (sorted)
    rows_ptr,  # [N, D]
    out_ptr,  # [M, D] fp32, zero-initialised
    NK,
    K,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    # One program = BLOCK_P consecutive occurrences in latent order x one BLOCK_D slice. Their latents form runs
    # (segments); seg[p] numbers the run of occurrence p within the block. With the one-hot matrix
    # A[l, p] = w[p] * (seg[p] == l), A @ rows[tok] gives every run's weighted row sum in one tl.dot (tensor cores
    # on GPU). Runs strictly inside the block belong to this program alone: plain stores. The first and the last
    # run may continue in the neighbouring blocks: fp32 atomics into the zero-initialised output.
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = pid.to(tl.int64) * BLOCK_P
    offs_p = start + tl.arange(0, BLOCK_P)
    mask_p = offs_p < NK
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lat = tl.load(lat_ptr + offs_p, mask=mask_p, other=-1).to(tl.int64)
    prev = tl.load(lat_ptr + tl.maximum(offs_p - 1, start), mask=mask_p, other=-1).to(tl.int64)
    seg = tl.cumsum((lat != prev).to(tl.int32), axis=0)
    pos = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
    w = tl.load(w_ptr + pos, mask=mask_p, other=0.0)
    r = tl.load(rows_ptr + (pos // K)[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :],
                other=0.0)
    runs = tl.arange(0, BLOCK_P)
    onehot = seg[None, :] == runs[:, None]  # [run, occurrence]
    if NATIVE_DOT:  # 16-bit inputs: their products are exact in the fp32 accumulator
        a = tl.where(onehot, w[None, :], 0.0).to(w.dtype)
        acc = tl.dot(a, r.to(w.dtype))
    else:  # fp32 inputs (and the interpreter, whose bf16 arithmetic is wrong): full-precision fp32 products
        a = tl.where(onehot, w.to(tl.float32)[None, :], 0.0)
        acc = tl.dot(a, r.to(tl.float32), input_precision="ieee")
    run_latent = tl.max(tl.where(onehot, lat[None, :], -1), axis=1)
    last = tl.max(tl.where(mask_p, seg, 0), axis=0)
    used = (run_latent >= 0)[:, None] & mask_d[None, :]
    edge = ((runs == 0) | (runs == last))[:, None]
    ptrs = out_ptr + tl.where(run_latent >= 0, run_latent, 0)[:, None] * D + offs_d[None, :]
    tl.store(ptrs, acc, mask=used & ~edge)
    tl.atomic_add(ptrs, acc, mask=used & edge)


_KERNEL_CACHE: dict[bool, SimpleNamespace] = {}


def _kernels() -> SimpleNamespace:
    """The jitted kernels, wrapped on first use and cached per TRITON_INTERPRET state (triton decides between
    compiled and interpreted at decoration time)."""
    _import_triton()
    interp = _interpreting()
    ks = _KERNEL_CACHE.get(interp)
    if ks is None:
        ks = SimpleNamespace(
            gws=triton.jit(_gws_kernel),
            gdot=triton.jit(_gdot_kernel),
            scatter=triton.jit(_scatter_kernel),
            scatter_finalize=triton.jit(_scatter_finalize_kernel),
            scatter_dot=triton.jit(_scatter_dot_kernel),
        )
        _KERNEL_CACHE[interp] = ks
    return ks


def _check_triton_device(t: torch.Tensor) -> None:
    _import_triton()
    if not t.is_cuda and not _interpreting():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run them on CPU "
            "in triton's interpreter, or use the *_reference functions"
        )


# Default tile sizes. On GPU: BLOCK_D = 128 columns (256 B of bf16 per gathered row slice), 16-32 gathered rows per
# tile, 4 warps. In the interpreter the cost is per program and per op, not per element, so wider tiles are used.
_GPU_BLOCK_D = 128
_GPU_MAX_BLOCK_K = 32
_GPU_BLOCK_P = 16  # ~ the mean number of occurrences per latent (N*k/M) in typical runs
_GPU_SEG = 256
_NUM_WARPS = 4


def _pick_block_d(d: int, block_d: int | None) -> int:
    if block_d is not None:
        return _as_pow2("block_d", block_d)
    if _interpreting():
        return min(_next_pow2(d), 1024)
    return _GPU_BLOCK_D


def _pick_block_k(k: int, block_k: int | None) -> int:
    if block_k is not None:
        return _as_pow2("block_k", block_k)
    if _interpreting():
        return min(max(_next_pow2(k), 16), 128)
    return min(max(_next_pow2(k), 16), _GPU_MAX_BLOCK_K)


def _as_pow2(name: str, v: int) -> int:
    if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"{name} must be a positive power of two, got {v!r}")
    return v


def _launch_kwargs() -> dict:
    return {} if _interpreting() else {"num_warps": _NUM_WARPS}


# ----------------------------------------------------------------------------------------------------------------
# Triton host functions
# ----------------------------------------------------------------------------------------------------------------


def gather_weighted_sum_triton(
    weights: torch.Tensor,
    indices: torch.Tensor,
    table: torch.Tensor,
    *,
    block_k: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`gather_weighted_sum_reference`. Grid (N, cdiv(d, BLOCK_D)); each program sums its
    token's k gathered table row slices, BLOCK_K rows at a time, in fp32."""
    _validate_gws(weights, indices, table)
    _check_triton_device(table)
    out_dtype = torch.result_type(weights, table)
    n, k = indices.shape
    m, d = table.shape
    out = torch.empty(n, d, dtype=out_dtype, device=table.device)
    if n == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    bk, bd = _pick_block_k(k, block_k), _pick_block_d(d, block_d)
    grid = (n, _cdiv(d, bd))
    _kernels().gws[grid](
        weights.contiguous(), indices.contiguous(), table.contiguous(), out, k, d, m,
        BLOCK_K=bk, BLOCK_D=bd, **_launch_kwargs(),
    )
    return out


def gather_dot_triton(
    rows: torch.Tensor,
    table: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_k: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`gather_dot_reference`. Grid (N, cdiv(k, BLOCK_K)); each program computes BLOCK_K
    dot products of one token, looping over d in BLOCK_D slices, in fp32."""
    _validate_gdot(rows, table, indices)
    _check_triton_device(rows)
    out_dtype = torch.result_type(rows, table)
    n, k = indices.shape
    m, d = table.shape
    out = torch.empty(n, k, dtype=out_dtype, device=rows.device)
    if n == 0 or k == 0:
        return out
    if d == 0:
        return out.zero_()
    bk, bd = _pick_block_k(k, block_k), _pick_block_d(d, block_d)
    grid = (n, _cdiv(k, bk))
    _kernels().gdot[grid](
        rows.contiguous(), table.contiguous(), indices.contiguous(), out, k, d, m,
        BLOCK_K=bk, BLOCK_D=bd, **_launch_kwargs(),
    )
    return out


def scatter_outer_triton(
    weights: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    *,
    block_p: int | None = None,
    block_d: int | None = None,
    seg: int | None = None,
    kernel: str = "segment",
) -> torch.Tensor:
    """Triton version of :func:`scatter_outer_reference`, a per-latent (CSR) reduction. ``kernel`` "dot" runs
    :func:`_scatter_outer_dot` instead (tensor-core segment reduction; ``block_p`` and ``block_d`` apply there too).

    "segment":

    Host side (a handful of small torch ops, no host sync): stable-sort the flat indices -> ``order``; CSR offsets
    per latent by ``searchsorted``; split each latent's occurrence list into segments of at most ``seg`` entries
    (one for almost every latent); map work items to latents with another ``searchsorted``. The grid is an upper
    bound on the number of work items (num_rows + N*k // seg) times cdiv(d, BLOCK_D), so no sync is needed.
    Kernel: each work item reduces its occurrences in chunks of BLOCK_P (vectorised gather of the token rows) into
    fp32 and stores the result; only latents with more than ``seg`` occurrences go through fp32 atomics into a
    small buffer of at most N*k // (seg + 1) rows, then copied (cast) into the output.
    Latents that never occur get zeros. Results of heavy latents are not bitwise deterministic (atomics)."""
    _validate_scatter(weights, indices, rows, num_rows)
    _check_triton_device(rows)
    out_dtype = torch.result_type(weights, rows)
    n, k = indices.shape
    d = rows.shape[1]
    dev = rows.device
    nk = n * k
    if nk == 0 or d == 0 or num_rows == 0:
        if nk > 0 and num_rows == 0:
            raise ValueError("scatter_outer: num_rows is 0 but indices are not empty")
        return torch.zeros(num_rows, d, dtype=out_dtype, device=dev)

    if kernel not in SCATTER_KERNELS:
        raise ValueError(f"scatter_outer: kernel must be one of {SCATTER_KERNELS}, got {kernel!r}")
    if kernel == "dot":
        return _scatter_outer_dot(weights, indices, rows, num_rows, out_dtype, block_p, block_d)
    bd = _pick_block_d(d, block_d)
    bp = _as_pow2("block_p", block_p) if block_p is not None else (64 if _interpreting() else _GPU_BLOCK_P)
    sg = _GPU_SEG if seg is None else int(seg)
    if sg < bp or sg % bp:
        raise ValueError(f"seg must be a positive multiple of block_p={bp}, got {sg}")

    m_rows = num_rows
    _, order, offsets = _csr_by_latent(indices.contiguous(), m_rows)
    counts = offsets[1:] - offsets[:-1]
    nseg = torch.clamp((counts + (sg - 1)) // sg, min=1)
    seg_end = torch.cumsum(nseg, 0)
    seg_first = seg_end - nseg
    w_max = m_rows + nk // sg
    item_latent = torch.searchsorted(seg_end, torch.arange(w_max, device=dev, dtype=seg_end.dtype), right=True)
    heavy = counts > sg
    heavy_rank = torch.cumsum(heavy, 0) - 1
    h_max = nk // (sg + 1)
    heavy_map = torch.full((max(h_max, 1),), -1, dtype=torch.int64, device=dev)
    heavy_buf = torch.zeros(max(h_max, 1), d if h_max > 0 else 1, dtype=torch.float32, device=dev)

    out = torch.empty(m_rows, d, dtype=out_dtype, device=dev)
    ks = _kernels()
    n_d = _cdiv(d, bd)
    ks.scatter[(w_max, n_d)](
        weights.contiguous().reshape(-1), order, offsets, item_latent, seg_first, heavy_rank, heavy_map,
        heavy_buf, rows.contiguous(), out, k, d, m_rows,
        SEG=sg, BLOCK_P=bp, BLOCK_D=bd, **_launch_kwargs(),
    )
    if h_max > 0:
        ks.scatter_finalize[(h_max, n_d)](heavy_map, heavy_buf, out, d, BLOCK_D=bd, **_launch_kwargs())
    return out


SCATTER_KERNELS = ("segment", "dot")
_GPU_DOT_BLOCK_P = 64  # occurrences per tl.dot: [64, 64] one-hot x [64, BLOCK_D] rows; untimed until a GPU runs it


def _scatter_outer_dot(weights, indices, rows, num_rows: int, out_dtype, block_p, block_d) -> torch.Tensor:
    """scatter_outer by ``_scatter_dot_kernel``: sort the flat indices once (stable), then one program per
    BLOCK_P consecutive occurrences in latent order; fp32 output buffer (zero-initialised for the atomics at block
    edges and the latents that never occur), cast at the end when the output is 16-bit."""
    n, k = indices.shape
    d = rows.shape[1]
    nk = n * k
    flat = indices.contiguous().reshape(-1)
    latents, order = torch.sort(flat, stable=True)
    interp = _interpreting()
    bp = _as_pow2("block_p", block_p) if block_p is not None else (min(max(_next_pow2(nk), 16), 128) if interp
                                                                    else _GPU_DOT_BLOCK_P)
    if bp < 16:
        raise ValueError(f"block_p must be at least 16 for the dot kernel (tl.dot's smallest tile), got {bp}")
    bd = max(_pick_block_d(d, block_d), 16)
    out = torch.zeros(num_rows, d, dtype=torch.float32, device=rows.device)
    w, r = weights.contiguous().reshape(-1), rows.contiguous()
    native = not interp and w.dtype == r.dtype and w.dtype in (torch.bfloat16, torch.float16)
    _kernels().scatter_dot[(_cdiv(nk, bp), _cdiv(d, bd))](
        w, order, latents, r, out, nk, k, d, BLOCK_P=bp, BLOCK_D=bd, NATIVE_DOT=native, **_launch_kwargs())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------------------------------


def gather_weighted_sum(weights: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[n] = sum_j weights[n, j] * table[indices[n, j]]`` -> [N, d]; Triton on CUDA, else the reference."""
    if use_triton(table):
        return gather_weighted_sum_triton(weights, indices, table)
    return gather_weighted_sum_reference(weights, indices, table)


def gather_dot(rows: torch.Tensor, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``out[n, j] = <rows[n], table[indices[n, j]]>`` -> [N, k]; Triton on CUDA, else the reference."""
    if use_triton(rows):
        return gather_dot_triton(rows, table, indices)
    return gather_dot_reference(rows, table, indices)


def scatter_outer(weights: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, num_rows: int,
                  kernel: str = "segment") -> torch.Tensor:
    """``out[m] = sum_{indices[n, j] == m} weights[n, j] * rows[n]`` -> [num_rows, d]; Triton on CUDA (``kernel``:
    one of SCATTER_KERNELS), else the reference."""
    if use_triton(rows):
        return scatter_outer_triton(weights, indices, rows, num_rows, kernel=kernel)
    return scatter_outer_reference(weights, indices, rows, num_rows)


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class SparseDecode(torch.autograd.Function):
    """``y = gather_weighted_sum(acts, indices, weight)``; differentiable w.r.t. ``acts`` [N, k] and ``weight``
    [M, d] (not ``indices``). Backward: d_acts = gather_dot(grad, weight, indices);
    d_weight = scatter_outer(acts, indices, grad, M). Grads come back in their input's dtype."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, acts: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                scatter_kernel: str = "segment") -> torch.Tensor:
        ctx.save_for_backward(acts, indices, weight)
        ctx.scatter_kernel = scatter_kernel
        return gather_weighted_sum(acts, indices, weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        acts, indices, weight = ctx.saved_tensors
        d_acts = d_weight = None
        if ctx.needs_input_grad[0]:
            d_acts = gather_dot(grad, weight, indices).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            d_weight = scatter_outer(acts, indices, grad, weight.shape[0], ctx.scatter_kernel).to(weight.dtype)
        return d_acts, None, d_weight, None


def sparse_decode(acts: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                  scatter_kernel: str = "segment") -> torch.Tensor:
    """Differentiable ``sum_j acts[:, j] * weight[indices[:, j]]`` -> [N, d] (no bias). ``scatter_kernel``: the
    Triton scatter_outer of the weight gradient (SCATTER_KERNELS)."""
    return SparseDecode.apply(acts, indices, weight, scatter_kernel)


class SparseEncode(torch.autograd.Function):
    """``pre = gather_dot(x, weight, indices)`` [N, k]: the encoder pre-activations at the selected latents (no
    bias); differentiable w.r.t. ``x`` [N, d] and ``weight`` [M, d]. Backward:
    d_x = gather_weighted_sum(grad, indices, weight); d_weight = scatter_outer(grad, indices, x, M).
    When the caller already has these values (gathered from a dense pre-activation GEMM), it passes them as
    ``values`` and the forward skips the gather-dot; the backward is the same."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                values: torch.Tensor | None = None, scatter_kernel: str = "segment") -> torch.Tensor:
        ctx.save_for_backward(x, weight, indices)
        ctx.scatter_kernel = scatter_kernel
        return gather_dot(x, weight, indices) if values is None else values.detach().clone()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, indices = ctx.saved_tensors
        d_x = d_weight = None
        if ctx.needs_input_grad[0]:
            d_x = gather_weighted_sum(grad, indices, weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d_weight = scatter_outer(grad, indices, x, weight.shape[0], ctx.scatter_kernel).to(weight.dtype)
        return d_x, d_weight, None, None, None


def sparse_encode(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                  values: torch.Tensor | None = None, scatter_kernel: str = "segment") -> torch.Tensor:
    """Differentiable ``<x[n], weight[indices[n, j]]>`` -> [N, k] (the selected pre-activations, no bias).
    ``values``: those numbers if already computed; then only the backward runs sparse kernels."""
    return SparseEncode.apply(x, weight, indices, values, scatter_kernel)
