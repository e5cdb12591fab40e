"""AuxK over a small set of latents with dense GEMMs: ``subset_decode``.

When few latents are dead, the AuxK latents of every token come from the same small set of rows D (the dead
latents). Their activations then form a dense [N, |D|] matrix A (each row zero outside that token's AuxK slots) and

    e_hat = A @ W_dec[D]                                                       [N, d_out]

is one GEMM; its backward is four more over the |D| rows of W_enc and W_dec, which stay in cache:

    dA = g @ W_dec[D]^T,  d_W_dec[D] = A^T g,  d_pre = dA * [A > 0],
    d_x = d_pre @ W_enc[D],  d_W_enc[D] = d_pre^T x,  d_b_enc[D] = sum_n d_pre.

A is relu(x W_enc[D]^T + b_enc[D]) at the chosen slots, so d_pre is its gradient (relu'(0) = 0, and zero outside
the slots). This is the same loss and the same gradients as ``sparse_decode(acts_at(x, indices))`` with k_aux
slots per token, but GEMMs beat per-slot gathers and scatters by far when |D| is a few times k_aux (CPU,
d_in = 768, |D| = 1229, k_aux = 384: the whole AuxK backward 486 ms against 1095 ms with the sparse kernels; see
bench/README.md). The caller picks the path (``SparseCoder.aux_reconstruction``).

With ``raise_only`` the gradient reaching the pre-activations is min(d_pre, 0): a descent step may raise a
chosen latent's pre-activation but never lower it (AuxK's `auxk_raise_only`, docs/SPEC.md section 2); the decoder
gradient is unchanged. ``raise_only_grad`` alone is that filter for the sparse path.

``subset_decode_reference`` is the same function written with plain autograd (it recomputes the pre-activations
that ``subset_decode`` takes as given); tests compare the two.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["SubsetDecode", "subset_decode", "subset_decode_reference", "raise_only_grad"]


class RaiseOnlyGrad(torch.autograd.Function):
    """Identity forward; backward passes min(grad, 0), so gradient descent can only raise the input."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(max=0)


def raise_only_grad(t: torch.Tensor) -> torch.Tensor:
    return RaiseOnlyGrad.apply(t)


def _check(acts, rows, x, w_enc, w_dec) -> None:
    if acts.ndim != 2 or rows.ndim != 1 or acts.shape[1] != rows.shape[0] or acts.shape[0] != x.shape[0]:
        raise ValueError(f"subset_decode: acts must be [N, len(rows)] with N = x.shape[0]; got acts "
                         f"{tuple(acts.shape)}, rows {tuple(rows.shape)}, x {tuple(x.shape)}")
    if w_enc.shape[0] != w_dec.shape[0] or w_enc.shape[1] != x.shape[1]:
        raise ValueError(f"subset_decode: w_enc [M, d_in] and w_dec [M, d_out] must share M, and d_in = x.shape[1]; "
                         f"got w_enc {tuple(w_enc.shape)}, w_dec {tuple(w_dec.shape)}, x {tuple(x.shape)}")


class SubsetDecode(torch.autograd.Function):
    """``acts @ w_dec[rows]``, differentiable w.r.t. ``x``, ``w_enc``, ``b_enc`` (through ``acts``, which are
    relu(x w_enc[rows]^T + b_enc[rows]) where nonzero) and ``w_dec``. Saves nothing larger than [N, |rows|]."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, acts: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, w_enc: torch.Tensor,
                b_enc: torch.Tensor, w_dec: torch.Tensor, raise_only: bool = False) -> torch.Tensor:
        _check(acts, rows, x, w_enc, w_dec)
        ctx.raise_only = raise_only
        dec_rows = w_dec.index_select(0, rows)
        ctx.save_for_backward(acts, rows, x, w_enc, dec_rows)
        ctx.w_dec_shape = w_dec.shape
        return acts.to(dec_rows.dtype) @ dec_rows

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        acts, rows, x, w_enc, dec_rows = ctx.saved_tensors
        grad = grad.to(dec_rows.dtype)
        d_x = d_w_enc = d_b_enc = d_w_dec = None
        if ctx.needs_input_grad[5]:
            d_w_dec = dec_rows.new_zeros(ctx.w_dec_shape)
            d_w_dec.index_copy_(0, rows, (acts.to(grad.dtype).mT @ grad).to(d_w_dec.dtype))
        if any(ctx.needs_input_grad[2:5]):
            d_pre = (grad @ dec_rows.mT).masked_fill_(acts <= 0, 0)
            if ctx.raise_only:
                d_pre.clamp_(max=0)
            if ctx.needs_input_grad[2]:
                d_x = (d_pre.to(w_enc.dtype) @ w_enc.index_select(0, rows)).to(x.dtype)
            if ctx.needs_input_grad[3]:
                d_w_enc = torch.zeros_like(w_enc)
                d_w_enc.index_copy_(0, rows, (d_pre.mT.to(x.dtype) @ x).to(w_enc.dtype))
            if ctx.needs_input_grad[4]:
                d_b_enc = w_enc.new_zeros(w_enc.shape[0])
                d_b_enc.index_copy_(0, rows, d_pre.sum(0, dtype=torch.promote_types(d_pre.dtype, torch.float32))
                                  .to(w_enc.dtype))
        return None, None, d_x, d_w_enc, d_b_enc, d_w_dec, None


def subset_decode(acts: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, w_enc: torch.Tensor,
                  b_enc: torch.Tensor, w_dec: torch.Tensor, raise_only: bool = False) -> torch.Tensor:
    """``acts [N, R] @ w_dec[rows]`` -> [N, d_out]; ``rows`` [R] distinct latent indices; ``acts`` the ReLU'd
    pre-activations of x at those latents, zero outside each token's chosen slots. Gradients as if ``acts`` had
    been computed from ``x``, ``w_enc``, ``b_enc`` (through ``raise_only`` when set)."""
    return SubsetDecode.apply(acts, rows, x, w_enc, b_enc, w_dec, raise_only)


def subset_decode_reference(acts: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, w_enc: torch.Tensor,
                            b_enc: torch.Tensor, w_dec: torch.Tensor, raise_only: bool = False) -> torch.Tensor:
    """The same by plain autograd: recompute the pre-activations at ``rows`` and keep the slots where acts > 0."""
    _check(acts, rows, x, w_enc, w_dec)
    pre = x @ w_enc[rows].mT + b_enc[rows]
    if raise_only:
        pre = raise_only_grad(pre)
    return torch.where(acts > 0, pre.relu(), 0).to(w_dec.dtype) @ w_dec[rows]
