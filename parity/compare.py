"""docs/SPEC.md section 4 as code: tolerances, selection checks, and comparisons of a backend's outputs with the
oracle."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .oracle import OracleResult, selection_violation

# (vectors and gradients: max|diff| / max|ref|, scalar losses: relative) per dtype, docs/SPEC.md section 4 ceilings
TOLERANCES = {"float32": (1e-4, 1e-5), "bfloat16": (2e-2, 1e-2), "float16": (2e-2, 1e-2)}
# Selection ties: a value may be out-ranked by at most this fraction of the row scale (rounding of the dtype)
SELECTION_SLACK = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


@dataclass
class Check:
    quantity: str
    error: float
    ceiling: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.ceiling)


def relative_max_error(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = np.abs(ref).max() if ref.size else 0.0
    diff = np.abs(got - ref).max() if ref.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def relative_scalar_error(got, ref) -> float:
    got, ref = float(got), float(ref)
    return abs(got - ref) / abs(ref) if ref != 0 else abs(got)


def index_sets_agree(pre, indices, ref_indices, slack: float) -> bool:
    """The backend's chosen latents equal the oracle's own, except for zeros and near-ties (docs/SPEC.md section 4).

    Both selections are ranked by the oracle's float64 pre-activation; rank by rank, the two indices must be equal
    or hold values within `slack` of each other (a tie, or both zero)."""
    if indices.shape != ref_indices.shape:
        return False
    ours = np.sort(np.take_along_axis(pre, indices, axis=1), axis=1)
    theirs = np.sort(np.take_along_axis(pre, ref_indices, axis=1), axis=1)
    ours_idx = np.take_along_axis(indices, np.argsort(np.take_along_axis(pre, indices, axis=1), axis=1), axis=1)
    theirs_idx = np.take_along_axis(ref_indices, np.argsort(np.take_along_axis(pre, ref_indices, axis=1), axis=1),
                                    axis=1)
    return bool(((ours_idx == theirs_idx) | (np.abs(ours - theirs) <= slack)).all())


def compare_with_oracle(backend: dict, ref: OracleResult, own_choice: OracleResult, *, dtype: str,
                        activation: str, k: int, dead_mask=None) -> list[Check]:
    """Compare a backend's forward outputs and gradients with the oracle evaluated on the backend's selection
    (`ref`), after checking that selection against the oracle's float64 pre-activations. `own_choice` is the
    oracle with its own selection, for the count and index-set checks of the k, AuxK and Multi-TopK selections
    (AuxK: k_aux = min(d_out // 2, num_dead) slots, the oracle's own k_aux largest dead latents).

    `backend` holds NumPy arrays: sae_out, latent_acts, latent_indices, fvu, auxk_loss, multi_topk_fvu, and
    grads (a dict by parameter name)."""
    vec_tol, scalar_tol = TOLERANCES[dtype]
    pre, sel = ref.pre_acts, ref.selection
    slack = SELECTION_SLACK[dtype] * max(float(pre.max()), 1e-30)
    wrong_count = sel.indices.shape[1] != k  # e.g. a Multi-TopK that overwrote the k outputs
    checks = [Check("selection", float("inf") if wrong_count else selection_violation(pre, sel.indices, activation, k),
                    slack)]
    own = own_choice.selection
    for name, got, expected in (("aux", sel.aux_indices, own.aux_indices),
                                ("multi-topk", sel.multi_indices, own.multi_indices)):
        if got is None and expected is None:
            continue
        # the count first: a valid selection of the wrong size (k_aux = num_dead, say) passes the other checks
        want = 0 if expected is None else expected.shape[1]
        have = 0 if got is None else got.shape[1]
        checks.append(Check(f"{name} count", float(abs(have - want)), 0.0))
        if got is None or expected is None or have != want:
            continue
        allowed = np.asarray(dead_mask, bool) if name == "aux" else None
        checks.append(Check(f"{name} selection", selection_violation(pre, got, "topk", 0, allowed=allowed), slack))
        agree = index_sets_agree(pre, got, expected, slack)
        checks.append(Check(f"{name} index sets (entries > 0, no near-ties)", 0.0 if agree else 1.0, 0.0))
    agree = index_sets_agree(pre, sel.indices, own_choice.latent_indices, slack)
    checks.append(Check("index sets (entries > 0, no near-ties)", 0.0 if agree else 1.0, 0.0))
    checks.append(Check("sae_out", relative_max_error(backend["sae_out"], ref.sae_out), vec_tol))
    checks.append(Check("latent_acts", relative_max_error(backend["latent_acts"], ref.latent_acts), vec_tol))
    for name in ("fvu", "auxk_loss", "multi_topk_fvu"):
        checks.append(Check(name, relative_scalar_error(backend[name], getattr(ref, name)), scalar_tol))
    for name, grad in ref.grads.items():
        checks.append(Check(f"grad {name}", relative_max_error(backend["grads"][name], grad), vec_tol))
    return checks
