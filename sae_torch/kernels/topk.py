"""Top-k selection over the dense pre-activations in one read: ``select_topk``.

The coder's selection is ``relu(pre).topk(k)`` over the [N, M] pre-activations, plus (AuxK) a top-k_aux over the
dead columns only. torch.topk is a multi-pass radix select: on an H200 ``topk(64)`` of the bf16 [16384, 65536]
pre-activations took 8.1 ms, more than the 5.9 ms GEMM that made them, and the ReLU before it another read and
write of the whole tensor (1.0 ms). ``select_topk_triton`` reads the tensor once:

Design notes: docs/internals.md, section `sae_torch/kernels/topk.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import sparse_rows as _sr

__all__ = ["METHODS", "Selection", "select_topk", "select_topk_reference", "select_topk_triton"]

tl = None  # triton.language, bound by _kernels() before the kernels are jitted (they read it as a global)


class Selection(NamedTuple):
    values: torch.Tensor  # [N, k], the input's dtype, ReLU'd (and biased) like the pre-activations they came from
    indices: torch.Tensor  # [N, k] int64 columns
    aux_values: torch.Tensor | None  # [N, k_aux] among the masked columns, or None without a mask
    aux_indices: torch.Tensor | None  # [N, k_aux] int64 columns (all inside the mask)


def _validate(pre: torch.Tensor, k: int, bias, aux_mask, k_aux: int) -> None:
    if pre.dim() != 2 or not pre.is_floating_point():
        raise ValueError(f"select_topk: pre must be a 2-D float tensor, got {pre.dtype} {tuple(pre.shape)}")
    m = pre.shape[1]
    if not 1 <= k <= m:
        raise ValueError(f"select_topk: k must lie in [1, {m}], got {k}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"select_topk: bias must be [{m}], got {tuple(bias.shape)}")
    if aux_mask is not None:
        if aux_mask.dtype != torch.bool or tuple(aux_mask.shape) != (m,):
            raise ValueError(f"select_topk: aux_mask must be a bool [{m}] tensor, got {aux_mask.dtype} "
                             f"{tuple(aux_mask.shape)}")
        if k_aux < 1:
            raise ValueError(f"select_topk: k_aux must be >= 1 with an aux_mask, got {k_aux}")


def select_topk_reference(pre: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, relu: bool = True,
                          aux_mask: torch.Tensor | None = None, k_aux: int = 0) -> Selection:
    """The torch path: ``act = relu(pre + bias)``; its top k per row; with ``aux_mask`` (which must hold at least
    k_aux True columns) also the top k_aux among the masked columns. Indices are int64, values in pre's dtype."""
    _validate(pre, k, bias, aux_mask, k_aux)
    act = pre if bias is None else pre + bias.to(pre.dtype)
    act = act.relu() if relu else act
    values, indices = act.topk(k, dim=-1, sorted=False)
    aux_values = aux_indices = None
    if aux_mask is not None:
        cols = aux_mask.nonzero().squeeze(-1)
        aux_values, slots = act.index_select(-1, cols).topk(k_aux, dim=-1, sorted=False)
        aux_indices = cols[slots]
    return Selection(values, indices, aux_values, aux_indices)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions; wrapped with triton.jit lazily like sparse_rows' kernels)
# ----------------------------------------------------------------------------------------------------------------


def _topk_tiles_kernel(
    pre_ptr,  # [N, M], any float dtype, row stride `stride`
    bias_ptr,  # [M] (read only when HAS_BIAS)
    mask_ptr,  # [M] bool as int8 (read only when KA_PAD > 0)
    keys_ptr,  # [N, T * K_PAD] int64 out: each tile's top K_PAD keys
    aux_keys_ptr,  # [N, T * KA_PAD] int64 out (written only when KA_PAD > 0)
    N,
    M,
    stride,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    TILE: tl.constexpr,
    K_PAD: tl.constexpr,
    KA_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITONIC: tl.constexpr,
):
    # One program = BLOCK_N rows x one TILE of columns. One load of the tile feeds both selections.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    row_ok = rows < N
    col_ok = cols < M
    ok = row_ok[:, None] & col_ok[None, :]
    v = tl.load(pre_ptr + rows[:, None] * stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        v = tl.maximum(v, 0.0)
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int order == float order
    key = (ordered.to(tl.int64) << 32) + (0xFFFFFFFF - cols)[None, :]  # ties: the lower column wins
    key = tl.where(ok, key, -9223372036854775808)
    _store_top(key, keys_ptr, rows, row_ok, tile, n_tiles, K_PAD, BITONIC)
    if KA_PAD > 0:
        dead = tl.load(mask_ptr + cols, mask=col_ok, other=0) != 0
        aux_key = tl.where(dead[None, :], key, -9223372036854775808)
        _store_top(aux_key, aux_keys_ptr, rows, row_ok, tile, n_tiles, KA_PAD, BITONIC)


def _topk_merge_kernel(
    keys_ptr,  # [N, C] int64 candidate keys
    out_ptr,  # [N, T * K_PAD] int64: each tile's top K_PAD
    N,
    C,
    TILE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITONIC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < C)[None, :]
    key = tl.load(keys_ptr + rows[:, None] * C + cols[None, :], mask=ok, other=-9223372036854775808)
    _store_top(key, out_ptr, rows, row_ok, tile, n_tiles, K_PAD, BITONIC)


def _store_top_body(key, out_ptr, rows, row_ok, slot, n_slots, K: tl.constexpr, BITONIC: tl.constexpr):
    # The K largest keys of each row of `key` [BLOCK_N, TILE] to slots slot * K .. slot * K + K - 1 of that row's
    # n_slots * K in out_ptr: tl.topk (BITONIC), or K rounds of a row max, largest first, each removing the key it
    # found (keys are unique: they hold the column).
    row_start = out_ptr + rows * (n_slots * K) + slot * K
    if BITONIC:
        tl.store(row_start[:, None] + tl.arange(0, K)[None, :], tl.topk(key, K), mask=row_ok[:, None])
    else:
        for j in range(K):
            best = tl.max(key, axis=1)
            tl.store(row_start + j, best, mask=row_ok)
            key = tl.where(key == best[:, None], -9223372036854775808, key)


_store_top = None  # triton.jit(_store_top_body), bound by _kernels()
_KERNEL_CACHE: dict = {}


def _kernels():
    global tl
    _sr._import_triton()
    tl = _sr.tl
    interp = _sr._interpreting()
    ks = _KERNEL_CACHE.get(interp)
    if ks is None:
        jit = _sr.triton.jit
        globals()["_store_top"] = jit(_store_top_body)  # the kernels call it by this global name
        ks = _KERNEL_CACHE[interp] = (jit(_topk_tiles_kernel), jit(_topk_merge_kernel))
    return ks


# Default tiles. GPU: 1024 columns per tile, one row per program (a [1, 1024] int64 bitonic top-k per program):
# untimed guesses until a GPU session measures (bench --variants topk=triton). The interpreter pays per program and
# per op, not per element: wide blocks there.
_GPU_TILE = 1024
_GPU_BLOCK_N = 1
_GPU_NUM_WARPS = 4


def _decode(keys: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    keys = keys[:, :k]
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32).to(dtype), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _merge_to(keys: torch.Tensor, k_sel: int, tile: int, block_n: int, bitonic: bool) -> torch.Tensor:
    """Reduce each row's candidate keys to its top k_sel (largest first) by merge passes."""
    _, merge = _kernels()
    n = keys.shape[0]
    tile = max(tile, _sr._next_pow2(2 * k_sel))  # each pass keeps at most half of what it reads
    while keys.shape[1] > k_sel:
        c = keys.shape[1]
        t = max(min(tile, _sr._next_pow2(c)), _sr._next_pow2(k_sel))
        n_tiles = _sr._cdiv(c, t)
        out = torch.empty(n, n_tiles * k_sel, dtype=torch.int64, device=keys.device)
        merge[(_sr._cdiv(n, block_n), n_tiles)](keys, out, n, c, TILE=t, K_PAD=k_sel, BLOCK_N=block_n,
                                                 BITONIC=bitonic, **_launch_kwargs())
        keys = out
    return keys


def _launch_kwargs() -> dict:
    return {} if _sr._interpreting() else {"num_warps": _GPU_NUM_WARPS}


METHODS = ("max", "bitonic")


def select_topk_triton(pre: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, relu: bool = True,
                       aux_mask: torch.Tensor | None = None, k_aux: int = 0, method: str = "max",
                       tile: int | None = None, block_n: int | None = None) -> Selection:
    """Triton version of :func:`select_topk_reference` (same arguments and results up to the choice among tied
    values; values and indices come sorted, largest first). ``aux_mask`` must hold at least k_aux True columns
    (not checked: that would cost a host sync; the coder passes k_aux = min(d_out // 2, #dead)).

    ``method``: how a program keeps its tile's top keys. "max": k rounds of a row max (k reductions over the
    tile); "bitonic": ``tl.topk``, a bitonic top-k of next_pow2(k) (log-squared compare-exchange stages; very slow
    in the interpreter, so tests keep it to tiny tiles). ``tile``, ``block_n``: powers of two, the columns and
    rows of one program."""
    _validate(pre, k, bias, aux_mask, k_aux)
    if method not in METHODS:
        raise ValueError(f"select_topk_triton: method must be one of {METHODS}, got {method!r}")
    _sr._check_triton_device(pre)
    bitonic = method == "bitonic"
    n, m = pre.shape
    k_sel = _sr._next_pow2(k) if bitonic else k
    ka_sel = (_sr._next_pow2(k_aux) if bitonic else k_aux) if aux_mask is not None else 0
    interp = _sr._interpreting()
    t = _sr._as_pow2("tile", tile) if tile is not None else (4096 if interp else _GPU_TILE)
    need = _sr._next_pow2(max(k_sel, ka_sel))  # a tile holds at least as many columns as it keeps
    t = max(min(t, _sr._next_pow2(m)), need)
    bn = _sr._as_pow2("block_n", block_n) if block_n is not None else (
        min(_sr._next_pow2(n), 64) if interp else _GPU_BLOCK_N)
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    n_tiles = _sr._cdiv(m, t)
    dev = pre.device
    keys = torch.empty(n, n_tiles * k_sel, dtype=torch.int64, device=dev)
    aux_keys = torch.empty(n, n_tiles * ka_sel if ka_sel else 1, dtype=torch.int64, device=dev)
    mask = aux_mask.view(torch.int8) if aux_mask is not None else keys  # placeholder pointer when unused
    tiles, _ = _kernels()
    if n:
        tiles[(_sr._cdiv(n, bn), n_tiles)](
            pre, bias if bias is not None else keys, mask, keys, aux_keys, n, m, pre.stride(0),
            HAS_BIAS=bias is not None, RELU=relu, TILE=t, K_PAD=k_sel, KA_PAD=ka_sel, BLOCK_N=bn, BITONIC=bitonic,
            **_launch_kwargs())
    values, indices = _decode(_merge_to(keys, k_sel, t, bn, bitonic), k, pre.dtype)
    aux_values = aux_indices = None
    if aux_mask is not None:
        aux_values, aux_indices = _decode(_merge_to(aux_keys, ka_sel, t, bn, bitonic), k_aux, pre.dtype)
    return Selection(values, indices, aux_values, aux_indices)


def select_topk(pre: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, relu: bool = True,
                aux_mask: torch.Tensor | None = None, k_aux: int = 0, method: str = "max") -> Selection:
    """Triton (``method``) when :func:`sae_torch.kernels.sparse_rows.use_triton` says so for ``pre``, else the
    reference."""
    if _sr.use_triton(pre):
        return select_topk_triton(pre, k, bias=bias, relu=relu, aux_mask=aux_mask, k_aux=k_aux, method=method)
    return select_topk_reference(pre, k, bias=bias, relu=relu, aux_mask=aux_mask, k_aux=k_aux)
