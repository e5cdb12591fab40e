"""The float64 oracle's hand-written gradients against central finite differences."""
import numpy as np
import pytest

from parity.fixtures import all_cases, make_case
from parity.oracle import evaluate, selection_violation

CASES = [c for c in all_cases(seed=1) if c.name.endswith(("dead_few", "dead_many"))]


def _loss(case, params, ref):
    # AuxK's target is under stop_gradient: hold it at the unperturbed residual
    residual = (case.x if case.y is None else case.y) - ref.sae_out
    return evaluate(params, case.x, case.y, activation=case.cfg.activation, k=case.cfg.k,
                    transcode=case.cfg.transcode, multi_topk=case.cfg.multi_topk, dead_mask=case.dead_mask,
                    auxk_alpha=0.5, selection=ref.selection, grads=False, stopped_residual=residual).loss


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_match_finite_differences(case):
    params = {name: value.astype(np.float64) for name, value in case.params.items()}
    ref = evaluate(params, case.x, case.y, activation=case.cfg.activation, k=case.cfg.k,
                   transcode=case.cfg.transcode, multi_topk=case.cfg.multi_topk, dead_mask=case.dead_mask,
                   auxk_alpha=0.5)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name, value in params.items():
        # every bias entry, and a random sample of matrix entries (the selection is held fixed)
        flat = range(value.size) if value.ndim == 1 else rng.choice(value.size, size=40, replace=False)
        for i in flat:
            bumped = {n: v.copy() for n, v in params.items()}
            bumped[name].reshape(-1)[i] += eps
            up = _loss(case, bumped, ref)
            bumped[name].reshape(-1)[i] -= 2 * eps
            down = _loss(case, bumped, ref)
            numeric = (up - down) / (2 * eps)
            analytic = ref.grads[name].reshape(-1)[i]
            assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(analytic), (name, i, numeric, analytic)


def test_auxk_and_multi_topk_reach_the_encoder():
    case = make_case(dead="many", multi_topk=False)
    base = dict(activation="topk", k=case.cfg.k, dead_mask=case.dead_mask)
    with_aux = evaluate(case.params, case.x, **base, auxk_alpha=1.0)
    without = evaluate(case.params, case.x, **base, auxk_alpha=0.0)
    diff = with_aux.grads["encoder.weight"] - without.grads["encoder.weight"]
    assert with_aux.auxk_loss > 0 and np.abs(diff).max() > 1e-4
    # only dead latents' encoder rows receive the AuxK gradient
    assert np.abs(diff[~case.dead_mask]).max() == 0


def test_selection_violation_detects_bad_choices():
    pre = np.array([[3.0, 1.0, 2.0, 0.0]])
    assert selection_violation(pre, np.array([[0, 2]]), "topk", 2) == 0
    assert selection_violation(pre, np.array([[0, 1]]), "topk", 2) == pytest.approx(1.0)
    assert selection_violation(pre, np.array([[0, 0]]), "topk", 2) == np.inf
    assert selection_violation(pre, np.array([[0, 2]]), "groupmax", 2) == 0
    assert selection_violation(pre, np.array([[1, 2]]), "groupmax", 2) == pytest.approx(2.0)
    assert selection_violation(pre, np.array([[2, 0]]), "groupmax", 2) == np.inf


def test_aux_selection_must_stay_within_dead_latents():
    pre = np.array([[3.0, 1.0, 2.0, 0.5]])
    dead = np.array([False, True, True, False])
    assert selection_violation(pre, np.array([[2]]), "topk", 0, allowed=dead) == 0
    assert selection_violation(pre, np.array([[1]]), "topk", 0, allowed=dead) == pytest.approx(1.0)
    assert selection_violation(pre, np.array([[0]]), "topk", 0, allowed=dead) == np.inf
