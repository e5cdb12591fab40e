"""AuxK over a small set of latents with dense matmuls: ``subset_decode``. The MLX twin of
:mod:`sae_torch.kernels.row_subset` (read its docstring for the math and why).

When few latents are dead, every token's AuxK latents come from the same small set of rows D, so the AuxK
activations form a dense [N, |D|] matrix A and e_hat = A @ W_dec[D]; the vjp is four matmuls over those rows:
dA = g W_dec[D]^T, d_W_dec[D] = A^T g, d_pre = dA * [A > 0], d_x = d_pre W_enc[D], d_W_enc[D] = d_pre^T x,
d_b_enc[D] = sum_n d_pre. Plain MLX matmuls (no Metal kernel needed); works under ``nn.value_and_grad``.

With ``raise_only`` the vjp passes min(d_pre, 0) to the encoder (AuxK's `auxk_raise_only`); ``raise_only_grad``
is that filter alone, for the sparse path.

``subset_decode_reference`` is the same function with MLX's own autograd (it recomputes the pre-activations that
``subset_decode`` takes as given); tests compare the two.
"""
from __future__ import annotations

import mlx.core as mx

__all__ = ["subset_decode", "subset_decode_reference", "raise_only_grad"]


@mx.custom_function
def raise_only_grad(t):
    """Identity; its vjp passes min(cotangent, 0), so gradient descent can only raise `t`."""
    return t


@raise_only_grad.vjp
def _raise_only_grad_vjp(primals, cotangent, output):
    return mx.minimum(cotangent, 0)


def _check(acts, rows, x, w_enc, w_dec) -> None:
    if acts.ndim != 2 or rows.ndim != 1 or acts.shape[1] != rows.shape[0] or acts.shape[0] != x.shape[0]:
        raise ValueError(f"subset_decode: acts must be [N, len(rows)] with N = x.shape[0]; got acts "
                         f"{tuple(acts.shape)}, rows {tuple(rows.shape)}, x {tuple(x.shape)}")
    if w_enc.shape[0] != w_dec.shape[0] or w_enc.shape[1] != x.shape[1]:
        raise ValueError(f"subset_decode: w_enc [M, d_in] and w_dec [M, d_out] must share M, and d_in = x.shape[1]; "
                         f"got w_enc {tuple(w_enc.shape)}, w_dec {tuple(w_dec.shape)}, x {tuple(x.shape)}")


def _decode(acts, rows, x, w_enc, b_enc, w_dec):
    return acts.astype(w_dec.dtype) @ w_dec[rows]


def _vjp(primals, cotangent, raise_only: bool):
    acts, rows, x, w_enc, b_enc, w_dec = primals
    grad = (cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent).astype(w_dec.dtype)
    dec_rows = w_dec[rows]
    # rows are distinct, so the scatter-adds below write each row once
    d_w_dec = mx.zeros_like(w_dec).at[rows].add((acts.astype(grad.dtype).T @ grad).astype(w_dec.dtype))
    d_pre = mx.where(acts > 0, grad @ dec_rows.T, 0)
    if raise_only:
        d_pre = mx.minimum(d_pre, 0)
    d_x = (d_pre.astype(w_enc.dtype) @ w_enc[rows]).astype(x.dtype)
    d_w_enc = mx.zeros_like(w_enc).at[rows].add((d_pre.T.astype(x.dtype) @ x).astype(w_enc.dtype))
    d_b_enc = mx.zeros_like(b_enc).at[rows].add(d_pre.astype(mx.float32).sum(axis=0).astype(b_enc.dtype))
    return mx.zeros_like(acts), mx.zeros_like(rows), d_x, d_w_enc, d_b_enc, d_w_dec


_subset_decode = {flag: mx.custom_function(_decode) for flag in (False, True)}  # custom vjps take no flags
_subset_decode[False].vjp(lambda primals, cotangent, output: _vjp(primals, cotangent, False))
_subset_decode[True].vjp(lambda primals, cotangent, output: _vjp(primals, cotangent, True))


def subset_decode(acts: mx.array, rows: mx.array, x: mx.array, w_enc: mx.array, b_enc: mx.array,
                  w_dec: mx.array, raise_only: bool = False) -> mx.array:
    """``acts [N, R] @ w_dec[rows]`` -> [N, d_out]; ``rows`` [R] distinct latent indices; ``acts`` the ReLU'd
    pre-activations of x at those latents, zero outside each token's chosen slots. Gradients as if ``acts`` had
    been computed from ``x``, ``w_enc``, ``b_enc`` (``acts`` itself gets none)."""
    _check(acts, rows, x, w_enc, w_dec)
    return _subset_decode[raise_only](mx.stop_gradient(acts), rows, x, w_enc, b_enc, w_dec)


def subset_decode_reference(acts: mx.array, rows: mx.array, x: mx.array, w_enc: mx.array, b_enc: mx.array,
                            w_dec: mx.array, raise_only: bool = False) -> mx.array:
    """The same by MLX's autograd: recompute the pre-activations at ``rows`` and keep the slots where acts > 0."""
    _check(acts, rows, x, w_enc, w_dec)
    pre = x @ w_enc[rows].T + b_enc[rows]
    if raise_only:
        pre = raise_only_grad(pre)
    return mx.where(acts > 0, mx.maximum(pre, 0), 0).astype(w_dec.dtype) @ w_dec[rows]
