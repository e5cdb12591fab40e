"""A float64 NumPy oracle of docs/SPEC.md section 2: forward pass, losses, and hand-written gradients of the total loss.

Everything a backend computes is compared with this. It can select latents itself or be evaluated on a backend's
own selection (docs/SPEC.md section 4), since near-ties may be broken differently by different top-k implementations.
The forward and the selection are `sae_core.reference` (the same code proves every `sae convert`); this module adds
the losses and their gradients. Written for clarity on small test shapes (dense [N, M] arrays).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sae_core.loop import total_loss
from sae_core.reference import (decode_latents, encoder_input, pre_activations, reconstruct, select_indices,
                                selection_violation, topk_indices)

__all__ = ["PARAM_NAMES", "Selection", "OracleResult", "auxk_sizes", "multi_topk_size", "select", "evaluate",
           "selection_violation"]

PARAM_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip")


@dataclass
class Selection:
    """The latent indices a forward pass chose: the k (or groupmax) ones, the AuxK ones and the Multi-TopK ones."""
    indices: np.ndarray
    aux_indices: np.ndarray | None = None
    multi_indices: np.ndarray | None = None


@dataclass
class OracleResult:
    sae_out: np.ndarray
    latent_acts: np.ndarray
    latent_indices: np.ndarray
    fvu: float
    auxk_loss: float
    multi_topk_fvu: float
    loss: float
    pre_acts: np.ndarray
    selection: Selection
    grads: dict[str, np.ndarray] = field(default_factory=dict)


def auxk_sizes(num_dead: int, d_out: int) -> tuple[int, float]:
    """(k_aux, scale) of SPEC's AuxK for this many dead latents."""
    half = d_out // 2
    return min(half, num_dead), min(num_dead / half, 1.0)


def multi_topk_size(k: int, num_latents: int) -> int:
    return min(4 * k, num_latents)


def select(pre: np.ndarray, activation: str, k: int, dead_mask=None, multi_topk=False, d_out=None) -> Selection:
    """The oracle's own selection for pre-activations `pre` (post-ReLU)."""
    indices = select_indices(pre, activation, k)
    aux = None
    if dead_mask is not None and dead_mask.sum() > 0:
        k_aux, _ = auxk_sizes(int(dead_mask.sum()), d_out)
        aux = topk_indices(np.where(dead_mask[None, :], pre, -np.inf), k_aux)
    multi = topk_indices(pre, multi_topk_size(k, pre.shape[1])) if multi_topk else None
    return Selection(indices, aux, multi)


def _scatter_outer(weights, indices, rows, num_rows):
    out = np.zeros((num_rows, rows.shape[1]))
    np.add.at(out, indices.reshape(-1), (weights[:, :, None] * rows[:, None, :]).reshape(-1, rows.shape[1]))
    return out


def _gather_dot(rows, w, indices):
    return np.einsum("nd,nkd->nk", rows, w[indices])


def evaluate(params: dict, x, y=None, *, activation="topk", k=32, transcode=False, multi_topk=False,
             dead_mask=None, auxk_alpha=1 / 32, selection: Selection | None = None, grads=True,
             stopped_residual=None, auxk_raise_only=False) -> OracleResult:
    """Forward pass of docs/SPEC.md section 2 in float64; with `grads`, the gradient of
    loss = fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8 w.r.t. every parameter present in `params`.

    AuxK's target e is under stop_gradient, so its gradient is not the derivative of the loss value;
    `stopped_residual` pins that target to a given array, which makes finite differences of `loss` comparable.
    `auxk_raise_only`: AuxK's gradient at its activations is clipped to min(g, 0) (SPEC section 2; then the
    gradients are no longer the loss's derivative)."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = np.asarray(x, dtype=np.float64)
    y = x if y is None else np.asarray(y, dtype=np.float64)
    w_enc, b_enc, w_dec, b_dec = p["encoder.weight"], p["encoder.bias"], p["W_dec"], p["b_dec"]
    w_skip = p.get("W_skip")
    num_latents, d_out = w_dec.shape
    dead = None if dead_mask is None else np.asarray(dead_mask, dtype=bool)

    x_in = encoder_input(x, b_dec, transcode)
    pre = pre_activations(x_in, w_enc, b_enc)
    if selection is None:
        selection = select(pre, activation, k, dead, multi_topk, d_out)

    def output(indices):
        acts = np.take_along_axis(pre, indices, axis=1)
        return acts, reconstruct(x, acts, indices, w_dec, b_dec, w_skip)

    acts, sae_out = output(selection.indices)
    e = y - sae_out
    total_variance = ((y - y.mean(axis=0)) ** 2).sum()
    fvu = (e ** 2).sum() / total_variance

    auxk_loss, scale = 0.0, 0.0
    if selection.aux_indices is not None:
        _, scale = auxk_sizes(int(dead.sum()), d_out)
        aux_acts = np.take_along_axis(pre, selection.aux_indices, axis=1)
        e_hat = decode_latents(aux_acts, selection.aux_indices, w_dec)  # no b_dec, no skip: e holds both already
        target = e if stopped_residual is None else stopped_residual
        auxk_loss = scale * ((e_hat - target) ** 2).sum() / total_variance

    multi_fvu = 0.0
    if selection.multi_indices is not None:
        multi_acts, multi_out = output(selection.multi_indices)
        multi_fvu = ((multi_out - y) ** 2).sum() / total_variance

    loss = total_loss(fvu, auxk_loss, multi_fvu, auxk_alpha)
    result = OracleResult(sae_out, acts, selection.indices, float(fvu), float(auxk_loss), float(multi_fvu),
                          float(loss), pre, selection)
    if not grads:
        return result

    # d loss / d (each decoded output), then back through the decoder into W_dec, b_dec, W_skip and pre.
    g = {name: np.zeros_like(value) for name, value in p.items()}
    d_pre = np.zeros_like(pre)

    def backprop_decode(grad_out, acts, indices, with_bias_and_skip, raise_only=False):
        g["W_dec"] += _scatter_outer(acts, indices, grad_out, num_latents)
        d_acts = _gather_dot(grad_out, w_dec, indices)
        np.add.at(d_pre, (np.arange(len(pre))[:, None], indices), np.minimum(d_acts, 0) if raise_only else d_acts)
        if with_bias_and_skip:
            g["b_dec"] += grad_out.sum(axis=0)
            if w_skip is not None:
                g["W_skip"] += grad_out.T @ x

    backprop_decode(-2 * e / total_variance, acts, selection.indices, True)
    if selection.multi_indices is not None:
        backprop_decode(2 * (multi_out - y) / total_variance / 8, multi_acts, selection.multi_indices, True)
    if selection.aux_indices is not None:
        backprop_decode(auxk_alpha * scale * 2 * (e_hat - e) / total_variance, aux_acts, selection.aux_indices,
                        False, auxk_raise_only)

    d_z = d_pre * (pre > 0)  # relu'(0) = 0: a selected zero passes nothing
    g["encoder.weight"] = d_z.T @ x_in
    g["encoder.bias"] = d_z.sum(axis=0)
    if not transcode:
        g["b_dec"] -= (d_z @ w_enc).sum(axis=0)
    result.grads = g
    return result
