"""PROTOTYPE (bench only): the kernel and model changes proposed for `sae_torch`, so that the benchmark can measure
them next to the current code. Nothing in the library imports this module; `sae_torch/` is unchanged.

What differs from `sae_torch.SparseCoder.forward` (the math, SPEC section 2, and its gradients are the same):

1. No recomputation of the chosen latents. The dense pre-activations (computed without autograd for the selection,
   as before) also give the selected values by a gather; a custom autograd Function (`SelectedEncode`) has the
   same backward as `SparseEncode` (d_x = gather_weighted_sum, d_W = scatter_outer, d_b = index_add), so the dense
   [N, M] tensor is still not kept for the backward. This removes the gather-dot forward of every selection.
2. The dense ReLU is not applied to [N, M]: top-k of pre and of relu(pre) choose the same latents except among
   entries <= 0, whose value is 0 either way (SPEC 4 compares index sets only among entries > 0). ReLU is applied
   to the k gathered values. Saves one [N, M] pass and one [N, M] allocation.
3. AuxK selects among the dead columns only (`pre.index_select(1, dead_idx)` then top-k), instead of
   `where(dead_mask, pre, -inf)` over all M columns (same latents, same order of magnitude less work when few
   latents are dead).
4. AuxK over the dead sub-matrices with dense GEMMs when the dead set is small (|D| <= AUX_DENSE_MAX_RATIO * k_aux):
   the AuxK activations form a dense [N, |D|] matrix A (zero outside each row's top-k_aux), e_hat = A @ W_dec[D],
   and the backward is four GEMMs over W_enc[D], W_dec[D] (cache-resident): dA = g @ W_dec[D]^T, d_W_dec[D] = A^T g,
   d_x = (dA * [A > 0]) @ W_enc[D], d_W_enc[D] = (dA * [A > 0])^T x_in. The AuxK loss, and its gradients into
   the encoder (which sparsify drops), are exactly those of the formula.
5. CPU kernels: gather_dot through aten's fused `_embedding_bag_per_sample_weights_backward` (no [chunk, k, d]
   gather copy, no bmm); scatter_outer through a CSR matrix in token order ([N, M], row n = token n, so no sort)
   multiplied transposed (`S.t() @ rows`) for light index sets, and through COO `torch.sparse.mm` for heavy ones.
   On CUDA the Triton kernels of `sae_torch.kernels` are used as they are.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from sae_torch import SparseCoder
from sae_torch.kernels import sparse_rows as sr

# AuxK uses the dense-subset GEMMs when the number of dead latents is at most this multiple of k_aux.
AUX_DENSE_MAX_RATIO = 8
# scatter_outer: CSR-transposed (no sort) when the mean number of occurrences per latent is at most this, else COO.
CSR_T_MAX_MEAN_OCCURRENCES = 16


# ---------------------------------------------------------------------------------------------------------------
# CPU kernel candidates (each computes exactly what the sae_torch function of the same role computes)
# ---------------------------------------------------------------------------------------------------------------


def _bags(n: int, k: int, device) -> tuple[Tensor, Tensor]:
    offsets = torch.arange(0, n * k, k, device=device)
    offset2bag = torch.arange(n, device=device).repeat_interleave(k)
    return offsets, offset2bag


def gather_dot_ebag(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """out[n, j] = <rows[n], table[indices[n, j]]> via aten's fused embedding_bag per-sample-weights backward."""
    n, k = indices.shape
    dtype = torch.result_type(rows, table)
    offsets, offset2bag = _bags(n, k, rows.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows.to(dtype).contiguous(), table.to(dtype).contiguous(), indices.reshape(-1).long(), offsets,
        offset2bag, 0, -1)
    return out.view(n, k)


def scatter_outer_csr_t(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """out[m] = sum_{indices[n,j]==m} weights[n,j] rows[n]: S [N, M] in CSR by token (no sort), out = S^T @ rows."""
    n, k = indices.shape
    dtype = torch.result_type(weights, rows)
    crow = torch.arange(0, n * k + 1, k, device=rows.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(crow, indices.reshape(-1).long(), weights.reshape(-1).to(dtype),
                                    (n, num_rows), check_invariants=False)
        return s.t() @ rows.to(dtype).contiguous()


def scatter_outer_coo(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """The same through a COO [M, N] matrix and torch.sparse.mm (coalesce sorts by latent)."""
    n, k = indices.shape
    dtype = torch.result_type(weights, rows)
    tok = torch.arange(n, device=rows.device).repeat_interleave(k)
    s = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1).long(), tok]), weights.reshape(-1).to(dtype),
                                (num_rows, n), check_invariants=False)
    return torch.sparse.mm(s, rows.to(dtype).contiguous())


def scatter_outer_ebag(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """The same through aten's embedding_bag dense backward (what sparsify's eager decoder backward runs)."""
    n, k = indices.shape
    dtype = torch.result_type(weights, rows)
    _, offset2bag = _bags(n, k, rows.device)
    return torch.ops.aten._embedding_bag_dense_backward(
        rows.to(dtype).contiguous(), indices.reshape(-1).long(), offset2bag,
        torch.full((n,), k, device=rows.device, dtype=torch.long), torch.empty(0, dtype=torch.long),
        num_rows, False, 0, weights.reshape(-1).to(dtype), -1)


def scatter_outer_index_add(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int,
                            chunk_elems: int = 1 << 24) -> Tensor:
    """The same with index_add_ over [chunk * k, d] contributions (sparsify's fused-encoder method, chunked)."""
    n, k = indices.shape
    d = rows.shape[1]
    dtype = torch.result_type(weights, rows)
    out = torch.zeros(num_rows, d, dtype=dtype, device=rows.device)
    c = max(1, chunk_elems // max(1, k * d))
    for s in range(0, n, c):
        contrib = (weights[s:s + c, :, None].to(dtype) * rows[s:s + c, None, :].to(dtype)).reshape(-1, d)
        out.index_add_(0, indices[s:s + c].reshape(-1), contrib)
    return out


def gather_dot_fast(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    if sr.use_triton(rows) or rows.dtype != torch.float32 or table.dtype != torch.float32:
        return sr.gather_dot(rows, table, indices)
    return gather_dot_ebag(rows, table, indices)


def scatter_outer_fast(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    if sr.use_triton(rows) or rows.dtype != torch.float32:
        return sr.scatter_outer(weights, indices, rows, num_rows)
    if indices.numel() <= CSR_T_MAX_MEAN_OCCURRENCES * num_rows:
        return scatter_outer_csr_t(weights, indices, rows, num_rows)
    return scatter_outer_coo(weights, indices, rows, num_rows)


# ---------------------------------------------------------------------------------------------------------------
# Autograd pieces
# ---------------------------------------------------------------------------------------------------------------


class SelectedEncode(torch.autograd.Function):
    """relu(values) where values = (x_in @ W^T + b)[n, indices[n, j]] were gathered from the dense pre-activations.
    Differentiable w.r.t. x_in, W, b with SparseEncode's backward; nothing dense is saved."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, values: Tensor, x_in: Tensor, weight: Tensor, bias: Tensor, indices: Tensor) -> Tensor:
        acts = F.relu(values)
        ctx.save_for_backward(x_in, weight, indices, acts)
        return acts

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_in, weight, indices, acts = ctx.saved_tensors
        g = torch.where(acts > 0, grad, 0).to(torch.result_type(grad, x_in))  # relu'(0) = 0
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[1]:
            d_x = sr.gather_weighted_sum(g, indices, weight).to(x_in.dtype)
        if ctx.needs_input_grad[2]:
            d_w = scatter_outer_fast(g, indices, x_in, weight.shape[0]).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            acc = torch.promote_types(g.dtype, torch.float32)
            d_b = torch.zeros(weight.shape[0], dtype=acc, device=g.device)
            d_b = d_b.index_add_(0, indices.reshape(-1), g.reshape(-1).to(acc)).to(weight.dtype)
        return None, d_x, d_w, d_b, None


class FastDecode(torch.autograd.Function):
    """sparse_decode with the fast CPU backward kernels (Triton on CUDA, as sae_torch)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, acts: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(acts, indices, weight)
        return sr.gather_weighted_sum(acts, indices, weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad: Tensor):
        acts, indices, weight = ctx.saved_tensors
        d_acts = d_w = None
        if ctx.needs_input_grad[0]:
            d_acts = gather_dot_fast(grad, weight, indices).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            d_w = scatter_outer_fast(acts, indices, grad, weight.shape[0]).to(weight.dtype)
        return d_acts, None, d_w


class DenseSubsetAux(torch.autograd.Function):
    """e_hat = A @ W_dec[D] with A = relu(pre[:, D]) kept only at each row's AuxK slots (a dense [N, |D|] matrix);
    differentiable w.r.t. x_in, W_enc, b_enc and W_dec by GEMMs over the dead rows D only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a: Tensor, x_in: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, dead_idx: Tensor):
        wd = w_dec.index_select(0, dead_idx)
        ctx.save_for_backward(a, x_in, w_enc, w_dec, dead_idx, wd)
        return a.to(wd.dtype) @ wd

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad: Tensor):
        a, x_in, w_enc, w_dec, dead_idx, wd = ctx.saved_tensors
        grad = grad.to(wd.dtype)
        d_x = d_we = d_be = d_wd = None
        if ctx.needs_input_grad[4]:
            d_wd = torch.zeros_like(w_dec)
            d_wd.index_copy_(0, dead_idx, (a.to(grad.dtype).mT @ grad).to(w_dec.dtype))
        if any(ctx.needs_input_grad[1:4]):
            d_a = torch.where(a > 0, grad @ wd.mT, 0)  # relu'(0) = 0; zero outside the selected slots
            if ctx.needs_input_grad[1]:
                d_x = (d_a.to(w_enc.dtype) @ w_enc.index_select(0, dead_idx)).to(x_in.dtype)
            if ctx.needs_input_grad[2]:
                d_we = torch.zeros_like(w_enc)
                d_we.index_copy_(0, dead_idx, (d_a.mT.to(x_in.dtype) @ x_in).to(w_enc.dtype))
            if ctx.needs_input_grad[3]:
                d_be = w_enc.new_zeros(w_enc.shape[0])
                d_be.index_copy_(0, dead_idx, d_a.sum(0).to(w_enc.dtype))
        return None, d_x, d_we, d_be, d_wd, None


# ---------------------------------------------------------------------------------------------------------------
# The prototype coder
# ---------------------------------------------------------------------------------------------------------------


class ProposedSparseCoder(SparseCoder):
    """sae_torch.SparseCoder with the proposed forward (module docstring). Same parameters and outputs."""

    def _select(self, pre: Tensor, k: int) -> Tensor:
        return pre.topk(k, dim=-1, sorted=False).indices

    def forward(self, x: Tensor, y: Tensor | None = None, *, dead_mask: Tensor | None = None):
        from sae_torch.sparse_coder import ForwardOutput

        y = x if y is None else y
        x_in = self.encoder_input(x)
        w_enc, b_enc = self.encoder.weight, self.encoder.bias
        need_aux = dead_mask is not None and bool(dead_mask.any())
        with torch.no_grad():
            pre = F.linear(x_in, w_enc, b_enc)  # [N, M]; no dense ReLU (item 2)
            top_idx = (self.select_indices(pre) if self.cfg.activation == "groupmax"
                       else self._select(pre, self.cfg.k))
            top_val = pre.gather(1, top_idx)
            aux = None
            if need_aux:
                dead_idx = dead_mask.nonzero().squeeze(1)
                k_aux = min(self.d_out // 2, dead_idx.numel())
                sub = pre.index_select(1, dead_idx)  # [N, |D|]
                sub_sel = sub.topk(k_aux, dim=-1, sorted=False)
                if dead_idx.numel() <= AUX_DENSE_MAX_RATIO * k_aux:
                    a = torch.zeros_like(sub).scatter_(1, sub_sel.indices, F.relu(sub_sel.values))
                    aux = ("dense", dead_idx, a)
                else:
                    aux = ("sparse", dead_idx[sub_sel.indices], sub_sel.values)
                del sub
            multi = None
            if self.cfg.multi_topk:
                multi_idx = self._select(pre, min(4 * self.cfg.k, self.num_latents))
                multi = (multi_idx, pre.gather(1, multi_idx))
            del pre  # only the sparse selections (and the small [N, |D|] AuxK matrix) live on

        skip = x.to(self.W_skip.dtype) @ self.W_skip.mT if self.W_skip is not None else 0
        top_acts = SelectedEncode.apply(top_val, x_in, w_enc, b_enc, top_idx)
        sae_out = FastDecode.apply(top_acts, top_idx, self.W_dec) + self.b_dec + skip
        e = y - sae_out
        total_variance = (y - y.mean(0)).float().pow(2).sum()
        fvu = e.float().pow(2).sum() / total_variance

        zero = fvu.new_zeros(())
        auxk_loss = multi_topk_fvu = zero
        if aux is not None:
            num_dead = int(dead_mask.sum())
            scale = min(num_dead / (self.d_out // 2), 1.0)
            if aux[0] == "dense":
                e_hat = DenseSubsetAux.apply(aux[2], x_in, w_enc, b_enc, self.W_dec, aux[1])
            else:
                aux_acts = SelectedEncode.apply(aux[2], x_in, w_enc, b_enc, aux[1])
                e_hat = FastDecode.apply(aux_acts, aux[1], self.W_dec)
            auxk_loss = scale * (e_hat.float() - e.detach().float()).pow(2).sum() / total_variance
        if multi is not None:
            multi_acts = SelectedEncode.apply(multi[1], x_in, w_enc, b_enc, multi[0])
            multi_out = FastDecode.apply(multi_acts, multi[0], self.W_dec) + self.b_dec + skip
            multi_topk_fvu = (multi_out - y).float().pow(2).sum() / total_variance
        return ForwardOutput(sae_out, top_acts, top_idx, fvu, auxk_loss, multi_topk_fvu)
