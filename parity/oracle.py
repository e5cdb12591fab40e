"""A float64 NumPy oracle of SPEC section 2: forward pass, losses, and hand-written gradients of the total loss.

Everything a backend computes is compared with this. It can select latents itself or be evaluated on a backend's
own selection (SPEC section 4), since near-ties may be broken differently by different top-k implementations.
Written for clarity on small test shapes (it builds dense [N, M] arrays and gathers [N, k, d] temporaries).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sae_core.loop import total_loss

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


def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of each row (ties broken towards the lower index)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def groupmax_indices(pre: np.ndarray, k: int) -> np.ndarray:
    n, m = pre.shape
    group = m // k
    return pre.reshape(n, k, group).argmax(axis=-1) + np.arange(k) * group


def auxk_sizes(num_dead: int, d_out: int) -> tuple[int, float]:
    """(k_aux, scale) of SPEC's AuxK for this many dead latents."""
    half = d_out // 2
    return min(half, num_dead), min(num_dead / half, 1.0)


def multi_topk_size(k: int, num_latents: int) -> int:
    return min(4 * k, num_latents)


def select(pre: np.ndarray, activation: str, k: int, dead_mask=None, multi_topk=False, d_out=None) -> Selection:
    """The oracle's own selection for pre-activations `pre` (post-ReLU)."""
    indices = groupmax_indices(pre, k) if activation == "groupmax" else topk_indices(pre, k)
    aux = None
    if dead_mask is not None and dead_mask.sum() > 0:
        k_aux, _ = auxk_sizes(int(dead_mask.sum()), d_out)
        aux = topk_indices(np.where(dead_mask[None, :], pre, -np.inf), k_aux)
    multi = topk_indices(pre, multi_topk_size(k, pre.shape[1])) if multi_topk else None
    return Selection(indices, aux, multi)


def _decode(acts, indices, w_dec):
    return np.einsum("nk,nkd->nd", acts, w_dec[indices])


def _scatter_outer(weights, indices, rows, num_rows):
    out = np.zeros((num_rows, rows.shape[1]))
    np.add.at(out, indices.reshape(-1), (weights[:, :, None] * rows[:, None, :]).reshape(-1, rows.shape[1]))
    return out


def _gather_dot(rows, w, indices):
    return np.einsum("nd,nkd->nk", rows, w[indices])


def evaluate(params: dict, x, y=None, *, activation="topk", k=32, transcode=False, multi_topk=False,
             dead_mask=None, auxk_alpha=1 / 32, selection: Selection | None = None, grads=True,
             stopped_residual=None) -> OracleResult:
    """Forward pass of SPEC section 2 in float64; with `grads`, the gradient of
    loss = fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8 w.r.t. every parameter present in `params`.

    AuxK's target e is under stop_gradient, so its gradient is not the derivative of the loss value;
    `stopped_residual` pins that target to a given array, which makes finite differences of `loss` comparable."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = np.asarray(x, dtype=np.float64)
    y = x if y is None else np.asarray(y, dtype=np.float64)
    w_enc, b_enc, w_dec, b_dec = p["encoder.weight"], p["encoder.bias"], p["W_dec"], p["b_dec"]
    w_skip = p.get("W_skip")
    num_latents, d_out = w_dec.shape
    dead = None if dead_mask is None else np.asarray(dead_mask, dtype=bool)

    x_in = x if transcode else x - b_dec
    z = x_in @ w_enc.T + b_enc
    pre = np.maximum(z, 0.0)
    if selection is None:
        selection = select(pre, activation, k, dead, multi_topk, d_out)

    def reconstruct(indices):
        acts = np.take_along_axis(pre, indices, axis=1)
        out = _decode(acts, indices, w_dec) + b_dec
        if w_skip is not None:
            out = out + x @ w_skip.T
        return acts, out

    acts, sae_out = reconstruct(selection.indices)
    e = y - sae_out
    total_variance = ((y - y.mean(axis=0)) ** 2).sum()
    fvu = (e ** 2).sum() / total_variance

    auxk_loss, scale = 0.0, 0.0
    if selection.aux_indices is not None:
        _, scale = auxk_sizes(int(dead.sum()), d_out)
        aux_acts = np.take_along_axis(pre, selection.aux_indices, axis=1)
        e_hat = _decode(aux_acts, selection.aux_indices, w_dec)  # no b_dec, no skip: e holds both already
        target = e if stopped_residual is None else stopped_residual
        auxk_loss = scale * ((e_hat - target) ** 2).sum() / total_variance

    multi_fvu = 0.0
    if selection.multi_indices is not None:
        multi_acts, multi_out = reconstruct(selection.multi_indices)
        multi_fvu = ((multi_out - y) ** 2).sum() / total_variance

    loss = total_loss(fvu, auxk_loss, multi_fvu, auxk_alpha)
    result = OracleResult(sae_out, acts, selection.indices, float(fvu), float(auxk_loss), float(multi_fvu),
                          float(loss), pre, selection)
    if not grads:
        return result

    # d loss / d (each decoded output), then back through the decoder into W_dec, b_dec, W_skip and pre.
    g = {name: np.zeros_like(value) for name, value in p.items()}
    d_pre = np.zeros_like(pre)

    def backprop_decode(grad_out, acts, indices, with_bias_and_skip):
        g["W_dec"] += _scatter_outer(acts, indices, grad_out, num_latents)
        np.add.at(d_pre, (np.arange(len(pre))[:, None], indices), _gather_dot(grad_out, w_dec, indices))
        if with_bias_and_skip:
            g["b_dec"] += grad_out.sum(axis=0)
            if w_skip is not None:
                g["W_skip"] += grad_out.T @ x

    backprop_decode(-2 * e / total_variance, acts, selection.indices, True)
    if selection.multi_indices is not None:
        backprop_decode(2 * (multi_out - y) / total_variance / 8, multi_acts, selection.multi_indices, True)
    if selection.aux_indices is not None:
        backprop_decode(auxk_alpha * scale * 2 * (e_hat - e) / total_variance, aux_acts, selection.aux_indices,
                        False)

    d_z = d_pre * (z > 0)  # relu'(0) = 0: a selected zero passes nothing
    g["encoder.weight"] = d_z.T @ x_in
    g["encoder.bias"] = d_z.sum(axis=0)
    if not transcode:
        g["b_dec"] -= (d_z @ w_enc).sum(axis=0)
    result.grads = g
    return result


def selection_violation(pre: np.ndarray, indices: np.ndarray, activation: str, k: int, allowed=None) -> float:
    """How far a selection is from valid: max over rows of (best unselected - worst selected), clipped at 0.

    topk: every selected value must be >= every unselected value of its row, and no index may repeat; with an
    `allowed` mask [M] (AuxK's dead latents) only allowed latents may be chosen and compete. groupmax: the j-th
    index must lie in group j and hold that group's max.
    """
    n, m = pre.shape
    chosen = np.take_along_axis(pre, indices, axis=1)
    if activation == "groupmax":
        group = m // k
        if not (indices // group == np.arange(k)).all():
            return float("inf")
        return float(max((pre.reshape(n, k, group).max(axis=-1) - chosen).max(), 0.0))
    if (np.diff(np.sort(indices, axis=1), axis=1) == 0).any():
        return float("inf")  # an index chosen twice in one row
    if allowed is not None:
        if not allowed[indices].all():
            return float("inf")
        pre = np.where(allowed[None, :], pre, -np.inf)
    unselected = np.ones_like(pre, dtype=bool)
    np.put_along_axis(unselected, indices, False, axis=1)
    best_unselected = np.where(unselected, pre, -np.inf).max(axis=1)
    gaps = best_unselected - chosen.min(axis=1)
    return float(max(np.nan_to_num(gaps, nan=0.0, neginf=0.0).max(), 0.0))
