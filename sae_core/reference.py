"""The one float64 NumPy reference of the sparse coder's forward pass and latent selection (docs/SPEC.md section 2).

Both checks of this project compute with it: the parity oracle (`parity/oracle.py`, which adds the losses and the
hand-written gradients on top) and the proof of every `sae convert` (`sae_core/convert.py`). It lives here, not in
`parity`, because the library must not import its test suite. NumPy only.

Weights may be stored in any float dtype (bf16 through ml_dtypes); each function casts what it reads to float64,
block by block over latents or rows, so a full-size checkpoint never needs a float64 copy of its weights.
"""
from __future__ import annotations

import numpy as np

LATENT_CHUNK = 8192  # latents per block of the dense pre-activation
GATHER_ELEMENTS = 1 << 24  # float64 elements per gathered [rows, k, d] block of the decoder (128 MiB)


# ---- selection ----

def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of each row, largest first (ties broken towards the lower index)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def groupmax_indices(pre: np.ndarray, k: int) -> np.ndarray:
    """Groupmax: the j-th index is the argmax of the j-th of k equal groups of latents."""
    n, m = pre.shape
    group = m // k
    return pre.reshape(n, k, group).argmax(axis=-1) + np.arange(k) * group


def select_indices(pre: np.ndarray, activation: str, k: int) -> np.ndarray:
    """The latents a forward pass keeps: top-k or groupmax of the (post-ReLU) pre-activations."""
    return groupmax_indices(pre, k) if activation == "groupmax" else topk_indices(pre, k)


def selection_boundary(pre: np.ndarray, activation: str, k: int) -> np.ndarray:
    """Per entry [N, M], the value it must reach to be selected: its row's k-th largest (topk) or its group's max."""
    n, m = pre.shape
    if activation == "groupmax":
        return np.repeat(pre.reshape(n, k, m // k).max(axis=-1), m // k, axis=1)
    kth = -np.partition(-pre, k - 1, axis=1)[:, k - 1]
    return np.broadcast_to(kth[:, None], pre.shape)


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


# ---- forward ----

def encoder_input(x: np.ndarray, b_dec: np.ndarray, transcode: bool) -> np.ndarray:
    """An autoencoder encodes x - b_dec; a transcoder encodes x as it is."""
    x = np.asarray(x, dtype=np.float64)
    return x if transcode else x - np.asarray(b_dec, dtype=np.float64)


def pre_activations(x_in: np.ndarray, w_enc: np.ndarray, b_enc: np.ndarray, chunk: int = LATENT_CHUNK) -> np.ndarray:
    """relu(x_in @ W_enc.T + b_enc) [N, M] in float64; W_enc is [M, d_in] (sparsify's encoder.weight)."""
    num_latents = w_enc.shape[0]
    pre = np.empty((len(x_in), num_latents))
    for start in range(0, num_latents, chunk):
        rows = slice(start, start + chunk)
        pre[:, rows] = x_in @ np.asarray(w_enc[rows], dtype=np.float64).T + np.asarray(b_enc[rows], dtype=np.float64)
    return np.maximum(pre, 0.0)


def decode_latents(acts: np.ndarray, indices: np.ndarray, w_dec: np.ndarray) -> np.ndarray:
    """sum_j acts[n, j] * W_dec[indices[n, j]]: [N, d_out] in float64, gathered in blocks of rows."""
    n, k = indices.shape
    d_out = w_dec.shape[1]
    out = np.empty((n, d_out))
    step = max(1, GATHER_ELEMENTS // max(1, k * d_out))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        out[rows] = np.einsum("nk,nkd->nd", np.asarray(acts[rows], dtype=np.float64),
                              np.asarray(w_dec[indices[rows]], dtype=np.float64))
    return out


def reconstruct(x: np.ndarray, acts: np.ndarray, indices: np.ndarray, w_dec: np.ndarray, b_dec: np.ndarray,
                w_skip: np.ndarray | None = None) -> np.ndarray:
    """The coder's output: the selected latents decoded, plus b_dec, plus x @ W_skip.T for a skip connection."""
    out = decode_latents(acts, indices, w_dec) + np.asarray(b_dec, dtype=np.float64)
    if w_skip is not None:
        out += np.asarray(x, dtype=np.float64) @ np.asarray(w_skip, dtype=np.float64).T
    return out


class SparseCoderReference:
    """One checkpoint's inference forward, from its config and tensors in sparsify's names (as stored).

    The interface `sae_core.convert.verify` compares two forwards through (SAELens's lives in `saelens.py`)."""

    def __init__(self, cfg, tensors: dict[str, np.ndarray], chunk: int = LATENT_CHUNK):
        self.cfg, self.t, self.chunk = cfg, tensors, chunk
        self.activation, self.k = cfg.activation, cfg.k
        self.num_latents = tensors["encoder.weight"].shape[0]

    def encoder_directions(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.t["encoder.weight"][idx], dtype=np.float64)

    def input_center(self) -> np.ndarray:
        d_in = self.t["encoder.weight"].shape[1]
        return np.zeros(d_in) if self.cfg.transcode else np.asarray(self.t["b_dec"], dtype=np.float64)

    def pre_acts(self, x: np.ndarray) -> np.ndarray:
        x_in = encoder_input(x, self.t["b_dec"], self.cfg.transcode)
        return pre_activations(x_in, self.t["encoder.weight"], self.t["encoder.bias"], self.chunk)

    def decode(self, x: np.ndarray, indices: np.ndarray, acts: np.ndarray) -> np.ndarray:
        return reconstruct(x, acts, indices, self.t["W_dec"], self.t["b_dec"], self.t.get("W_skip"))
