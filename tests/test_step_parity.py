"""parity.step: each trainer's step (torch, MLX eager, MLX compiled) against the float64 reference step, the step's
invariants (unit-norm decoder rows, the decoder gradient's component along each row removed), and bugs made the
same way in both trainers, or on MLX's compiled path only, each caught.

Measured with the mutation made in the source (seed 0; the worst value over the 3 steps; ceilings in
parity/step.py):
  renormalisation skipped (either trainer)       update given the state 0.52, decoder row norms 6.1e-3
  projection skipped (either trainer)            optimizer state 0.14, decoder gradient along rows 0.79
  MLX Adam eps 1e-8 -> 1e-7 / 1e-6               update given the state 0.44 / 0.82
  MLX Adam without the second-moment correction  update given the state 31
  MLX Adam bias correction with t + 1            update given the state 0.26
  MLX compiled AuxK: live slots not zeroed       optimizer state 0.43 (mlx-compiled only; eager passes)
  MLX compiled AuxK: scale from d_out            optimizer state 1.65 (mlx-compiled only)
Unmutated, seeds 0-4: optimizer state 3.8e-7 .. 3.5e-6, update given the state 2.5e-5 .. 1.9e-4, row norms
2.3e-7 .. 2.8e-7, gradient along rows 1.6e-7 .. 4.3e-7, tokens_since_fired equal.
"""
from __future__ import annotations

import numpy as np
import pytest

from parity.step import (BACKENDS, CEILINGS, REFERENCE_OPTIMIZERS, available_backends, make_setup, reference_step,
                         run_step_parity, start_state)


def failing(rows):
    return {row.quantity.removeprefix("step: ") for row in rows if not row.ok}


def needs(backend):
    reason = available_backends()[backend]
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in BACKENDS])
def test_each_trainer_matches_the_float64_step(backend):
    details: dict = {}
    rows = run_step_parity([backend], details=details)
    assert {r.quantity.removeprefix("step: ") for r in rows} == set(CEILINGS)
    assert not failing(rows), details
    setup = make_setup()
    assert 0 < setup.dead_at_start.sum() < setup.d_in // 2  # AuxK on, fewer dead than d_out // 2


@pytest.mark.parametrize("optimizer", list(REFERENCE_OPTIMIZERS))
def test_the_reference_step_keeps_its_invariants(optimizer):
    """The float64 step itself: unit-norm rows after every step, the projected gradient orthogonal to the rows it
    started from, b_dec set to the first batch's mean before the first update, latents firing reset."""
    setup = make_setup(optimizer)
    before = start_state(setup)
    for step in range(setup.total_steps):
        after, info = reference_step(setup, step, before)
        assert np.abs(np.linalg.norm(after.weights["W_dec"], axis=1) - 1).max() < 1e-6
        g, w = info["grads"]["W_dec"], info["start"]["W_dec"]
        assert np.abs((g * w).sum(1)).max() <= 1e-12 * np.abs(g).max()
        if step == 0:
            assert np.allclose(info["start"]["b_dec"], setup.batches[0].astype(np.float64).mean(0))
        assert (after.tokens_since_fired == 0).any() and (after.tokens_since_fired > 0).any()
        before = after


# ---- bugs injected the same way in both trainers, or in one backend's path only ----

def _torch_and_mlx_coders():
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from sae_mlx.sparse_coder import SparseCoder as MlxCoder
    from sae_torch.sparse_coder import SparseCoder as TorchCoder

    return TorchCoder, MlxCoder


def test_no_projection_in_both_trainers_is_caught(monkeypatch):
    torch_coder, mlx_coder = _torch_and_mlx_coders()
    monkeypatch.setattr(torch_coder, "remove_gradient_parallel_to_decoder_directions", lambda self: None)
    monkeypatch.setattr(mlx_coder, "remove_gradient_parallel_to_decoder_directions", lambda self, grads: grads)
    rows = run_step_parity(BACKENDS)
    for backend in BACKENDS:
        assert {"optimizer state", "decoder gradient along rows"} <= failing(
            [r for r in rows if r.path == f"step:{backend}"]), backend


def test_no_renormalisation_in_both_trainers_is_caught(monkeypatch):
    torch_coder, mlx_coder = _torch_and_mlx_coders()
    monkeypatch.setattr(torch_coder, "set_decoder_norm_to_unit_norm", lambda self: None)
    monkeypatch.setattr(mlx_coder, "set_decoder_norm_to_unit_norm", lambda self: None)
    rows = run_step_parity(BACKENDS)
    for backend in BACKENDS:
        assert {"update given the state", "decoder row norms"} <= failing(
            [r for r in rows if r.path == f"step:{backend}"]), backend


@pytest.mark.parametrize("bug", ["eps 1e-7", "no bias correction of the second moment"])
def test_an_mlx_adam_change_is_caught(monkeypatch, bug):
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from sae_mlx import optim

    if bug == "eps 1e-7":
        init = optim.Adam.__init__
        monkeypatch.setattr(optim.Adam, "__init__", lambda self, module: (init(self, module), setattr(
            self, "eps", 1e-7))[0])
    else:
        corrections = optim.Adam.bias_corrections
        monkeypatch.setattr(optim.Adam, "bias_corrections",
                            lambda self, t: (corrections(self, t)[0], mx.array(1.0, dtype=mx.float32)))
    rows = run_step_parity(["mlx", "mlx-compiled"])
    for backend in ("mlx", "mlx-compiled"):
        assert "update given the state" in failing([r for r in rows if r.path == f"step:{backend}"]), backend


def test_an_auxk_bug_on_the_compiled_path_only_is_caught(monkeypatch):
    """The compiled forward passes num_dead as an array (its fixed-size AuxK); a bug there alone (here: one dead
    latent too many in the scale) leaves the eager path right and must still fail."""
    _, mlx_coder = _torch_and_mlx_coders()
    import mlx.core as mx

    auxk_loss = mlx_coder.auxk_loss

    def compiled_only_bug(self, e, e_hat, num_dead, total_variance):
        if isinstance(num_dead, mx.array):
            num_dead = num_dead + 1
        return auxk_loss(self, e, e_hat, num_dead, total_variance)

    monkeypatch.setattr(mlx_coder, "auxk_loss", compiled_only_bug)
    rows = run_step_parity(["mlx", "mlx-compiled"])
    assert not failing([r for r in rows if r.path == "step:mlx"])
    assert "optimizer state" in failing([r for r in rows if r.path == "step:mlx-compiled"])
