"""Training parity (parity.training): the real training loops of torch and MLX, from the same init on the same
batches, agree within the measured ceilings (Adam tightly, element for element; signum on its loss curve, and
element for element only over its first steps); and the comparison catches a training-step bug."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from parity.training import CEILINGS, run_training_parity  # noqa: E402

STEPS = 200  # the ceilings were measured over 300 steps (seeds 0-4); fewer steps drift less


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_torch_and_mlx_train_alike(optimizer):
    details: dict = {}
    rows = run_training_parity(STEPS, optimizer, details=details)
    assert {r.quantity for r in rows} == set(CEILINGS[optimizer])
    failed = [f"{r.quantity}: {r.error:.3g} > {r.ceiling:.3g}" for r in rows if not r.ok]
    assert not failed, (failed, details)
    # the run exercised what it claims to: latents died, AuxK was on for most steps, and training progressed
    assert details["max dead %"] > 5 and details["steps with AuxK active"] > STEPS // 2, details
    assert details["fvu last / first (torch)"] < 0.7, details


def test_a_training_step_bug_is_caught(monkeypatch):
    """The MLX side with its decoder-gradient projection switched off (a plausible porting slip: MLX grads are
    values, so forgetting to use the returned dict loses it) fails the Adam comparison."""
    from sae_mlx.sparse_coder import SparseCoder

    monkeypatch.setattr(SparseCoder, "remove_gradient_parallel_to_decoder_directions", lambda self, grads: grads)
    rows = run_training_parity(60, "adam")
    failed = {r.quantity for r in rows if not r.ok}
    assert {"weights", "moments"} <= failed, rows
