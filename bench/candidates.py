"""CPU alternatives to sae_torch's two backward primitives, timed by the kernel micro-benchmark (`--candidates`)
against `sae_torch.kernels.sparse_rows.gather_dot_reference` / `scatter_outer_reference`, the current code.

Only implementations that sae_torch does not run on fp32 CPU tensors live here: the plain gather + bmm for
gather_dot (sae_torch uses aten's fused embedding_bag per-sample-weights backward), and for scatter_outer (sae_torch
uses aten's embedding_bag dense backward) the two sparse-matrix products it used before and sparsify's index_add_
way, so that the benchmark keeps showing whether the current choice is the faster one. Every function computes
exactly what the sae_torch function of the same role computes (up to fp32 summation order); nothing in the library
imports this module.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


def gather_dot_bmm(rows: Tensor, table: Tensor, indices: Tensor, chunk_elems: int = 1 << 22) -> Tensor:
    """out[n, j] = <rows[n], table[indices[n, j]]> by gathering [chunk, k, d] rows then a batched mat-vec (what
    sae_torch did on CPU before it used aten's embedding_bag backward). Chunked so the gather stays ~4M elements."""
    n, k = indices.shape
    d = rows.shape[1]
    out = torch.empty(n, k, dtype=torch.result_type(rows, table), device=rows.device)
    c = max(1, chunk_elems // max(1, k * d))
    for s in range(0, n, c):
        out[s:s + c] = torch.bmm(table[indices[s:s + c]], rows[s:s + c, :, None]).squeeze(-1)
    return out


def scatter_outer_csr_t(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """out[m] = sum_{indices[n,j]==m} weights[n,j] rows[n], always as S^T @ rows with S [N, M] in CSR by token (no
    sort needed: row n holds token n's k entries). sae_torch's way for light index sets before it used
    aten's embedding_bag backward."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=rows.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(crow, indices.reshape(-1).long(), weights.reshape(-1), (n, num_rows),
                                    check_invariants=False)
        return s.t() @ rows.contiguous()


def scatter_outer_coo(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """The same, always through a COO [M, N] matrix and torch.sparse.mm (which coalesces, i.e. sorts by latent).
    sae_torch's way for heavy index sets (AuxK's k_aux slots) before it used aten's embedding_bag backward."""
    n, k = indices.shape
    tokens = torch.arange(n, device=rows.device).repeat_interleave(k)
    s = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1).long(), tokens]), weights.reshape(-1),
                                (num_rows, n), check_invariants=False)
    return torch.sparse.mm(s, rows.contiguous())


def scatter_outer_index_add(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int,
                            chunk_elems: int = 1 << 24) -> Tensor:
    """The same with index_add_ of the [chunk * k, d] contributions weights[n, j] * rows[n] (sparsify's fused
    encoder backward builds all N * k of them at once; chunked here so that it does not cost N * k * d memory)."""
    n, k = indices.shape
    d = rows.shape[1]
    out = torch.zeros(num_rows, d, dtype=torch.result_type(weights, rows), device=rows.device)
    c = max(1, chunk_elems // max(1, k * d))
    for s in range(0, n, c):
        contrib = (weights[s:s + c, :, None] * rows[s:s + c, None, :]).reshape(-1, d)
        out.index_add_(0, indices[s:s + c].reshape(-1), contrib)
    return out


GATHER_DOT = {
    "gather + bmm, chunked (sae_torch before)": gather_dot_bmm,
}
SCATTER_OUTER = {
    "CSR[N,M] by token, S.t() @ rows (sae_torch before)": scatter_outer_csr_t,
    "COO[M,N] torch.sparse.mm (sae_torch before)": scatter_outer_coo,
    "index_add_ of [chunk*k, d] contributions (sparsify's encoder, chunked)": scatter_outer_index_add,
}
