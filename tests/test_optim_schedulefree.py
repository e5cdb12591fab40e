"""Schedule-free signum (sae_torch.optim.Signum, sae_mlx.optim.Signum) against what sparsify trains with:
`schedulefree.ScheduleFreeWrapper(sparsify.sign_sgd.SignSGD(params), momentum=0.95)` (test-only dependencies),
step by step on a real sparse coder's loss, the evaluation point, and exact resume from the saved state."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")
sign_sgd = pytest.importorskip("sparsify.sign_sgd")

from sae_core.config import SparseCoderConfig  # noqa: E402
from sae_torch.optim import Signum  # noqa: E402
from sae_torch.sparse_coder import SparseCoder  # noqa: E402

D_IN, K, EXPANSION, TOKENS = 24, 4, 4, 96


def _coder_and_data(seed: int = 0):
    torch.manual_seed(seed)
    sae = SparseCoder(D_IN, SparseCoderConfig(k=K, expansion_factor=EXPANSION), device="cpu", dtype=torch.float32)
    rng = np.random.default_rng(seed)
    batches = [torch.from_numpy(rng.normal(size=(TOKENS, D_IN)).astype(np.float32) * 2 + 0.5) for _ in range(8)]
    with torch.no_grad():
        sae.b_dec.copy_(batches[0].mean(0))  # b_dec != 0 before the first step, as the trainer sets it
    return sae, batches


def _backward(sae, x, dead_mask=None):
    out = sae(x, dead_mask=dead_mask)
    (out.fvu + out.auxk_loss / 32).backward()


def _lr(step: int) -> float:
    """A warm-up then a decay: lr_max and the lr^2 averaging weights see a changing learning rate."""
    return 4e-3 * min(1.0, (step + 1) / 10) * (1.0 if step < 40 else 0.5)


@pytest.mark.parametrize("r", [0.0, 2.0])
def test_steps_and_eval_point_equal_the_schedulefree_wrapper_bitwise(r):
    """80 steps on an SAE's own loss (gradients depend on the parameters, so any difference would grow): the
    parameters (train point y) equal the wrapper's bit for bit after every step, and every 10 steps the evaluation
    point (eval()) does too. r = 0 is sparsify's uniform average, r = 2 our default (average_power)."""
    ours_sae, batches = _coder_and_data()
    ref_sae = copy.deepcopy(ours_sae)
    ours = Signum(dict(ours_sae.named_parameters()), average_power=r)
    ref = schedulefree.ScheduleFreeWrapper(sign_sgd.SignSGD(ref_sae.parameters(), lr=_lr(0)), momentum=0.95, r=r)
    ref.train()
    dead = torch.zeros(ours_sae.num_latents, dtype=torch.bool)
    dead[::5] = True
    for step in range(80):
        x = batches[step % len(batches)]
        for sae in (ours_sae, ref_sae):
            _backward(sae, x, dead if step % 2 else None)
        for group in ref.param_groups:
            group["lr"] = _lr(step)
        ours.step(_lr(step))
        ref.step()
        ours.zero_grad()
        ref.zero_grad()
        for (name, p), q in zip(ours_sae.named_parameters(), ref_sae.parameters()):
            assert torch.equal(p, q), f"step {step}: {name} differs from the wrapper's"
        if step % 10 == 9:
            y = {n: p.detach().clone() for n, p in ref_sae.named_parameters()}
            ours.eval()
            ref.eval()
            for (name, p), q in zip(ours_sae.named_parameters(), ref_sae.parameters()):
                assert torch.equal(p, q), f"step {step}: eval point {name} differs from the wrapper's"
                assert not torch.equal(p, y[name]), "eval() did not move to the averaged iterate"
            ours.train()
            ref.train()
            for (name, p), q in zip(ours_sae.named_parameters(), ref_sae.parameters()):
                assert torch.equal(p, y[name]), "train() after eval() must restore the train point exactly"
                # the wrapper goes back by a lerp: the same point up to rounding
                torch.testing.assert_close(q, y[name], rtol=0, atol=1e-6 * float(y[name].abs().max()))
                q.data.copy_(y[name])  # continue both from the identical train point
    assert ours.k == 80 and ours.lr_max == 4e-3
    assert ours.weight_sum == sum((t + 1) ** r * max(_lr(s) for s in range(t + 1)) ** 2 for t in range(80))


def test_eval_before_any_step_is_a_no_op():
    sae, _ = _coder_and_data()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    opt = Signum(dict(sae.named_parameters()))
    opt.eval()
    opt.train()
    assert all(torch.equal(p, before[n]) for n, p in sae.named_parameters())
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.eval()
        _backward(sae, torch.randn(4, D_IN, generator=torch.Generator().manual_seed(0)))
        opt.step(1e-3)


def _run(sae, opt, batches, steps, start=0):
    for step in range(start, start + steps):
        _backward(sae, batches[step % len(batches)])
        opt.step(_lr(step))
        opt.zero_grad()


def test_resume_from_saved_state_equals_uninterrupted_torch(tmp_path):
    """Save as the trainer does (eval point in the SAE file, z/y/scalars in the state), load both into a fresh
    coder and optimizer, continue: bit for bit the uninterrupted run, in train and eval points."""
    from sae_core.checkpoint import load_safetensors_numpy, save_safetensors_numpy

    full_sae, batches = _coder_and_data()
    paused_sae = copy.deepcopy(full_sae)
    full = Signum(dict(full_sae.named_parameters()))
    _run(full_sae, full, batches, 30)

    paused = Signum(dict(paused_sae.named_parameters()))
    _run(paused_sae, paused, batches, 13)
    paused.eval()
    paused_sae.save_to_disk(tmp_path / "coder")
    save_safetensors_numpy(tmp_path / "state.safetensors",
                           {k: v.detach().cpu().numpy() for k, v in paused.state_tensors().items()})
    paused.train()
    assert set(paused.state_tensors()) == (
        {f"optimizer.{p}.{s}" for p, _ in paused_sae.named_parameters() for s in ("z", "y")}
        | {"optimizer.k", "optimizer.lr_max", "optimizer.weight_sum"})

    resumed_sae = SparseCoder.load_from_disk(tmp_path / "coder", "cpu", dtype=torch.float32)
    tensors, _ = load_safetensors_numpy(tmp_path / "state.safetensors")
    resumed = Signum(dict(resumed_sae.named_parameters()))
    resumed.load_state_tensors({k: torch.from_numpy(v) for k, v in tensors.items()})
    _run(resumed_sae, resumed, batches, 17, start=13)
    for (name, p), q in zip(full_sae.named_parameters(), resumed_sae.parameters()):
        assert torch.equal(p, q), name
    full.eval()
    resumed.eval()
    for (name, p), q in zip(full_sae.named_parameters(), resumed_sae.parameters()):
        assert torch.equal(p, q), name


mx = pytest.importorskip("mlx.core")


def _mlx_twin(sae):
    from sae_mlx.sparse_coder import SparseCoder as MlxCoder

    twin = MlxCoder(D_IN, sae.cfg, dtype=mx.float32)
    twin.update({"encoder": {"weight": mx.array(sae.encoder.weight.detach().numpy()),
                             "bias": mx.array(sae.encoder.bias.detach().numpy())},
                 "W_dec": mx.array(sae.W_dec.detach().numpy()), "b_dec": mx.array(sae.b_dec.detach().numpy())})
    return twin


def test_mlx_matches_torch_step_by_step_and_resumes_across_backends():
    """The MLX optimizer on the torch optimizer's gradients (the same inputs each step): parameters, eval point and
    state within float32 rounding of torch's after 60 steps; torch's saved state continues on MLX (and MLX's on
    torch) as the other backend continues it."""
    from sae_mlx.optim import Signum as MlxSignum

    sae, _ = _coder_and_data()
    twin = _mlx_twin(sae)
    t_opt, m_opt = Signum(dict(sae.named_parameters())), MlxSignum(twin)
    names = list(dict(sae.named_parameters()))
    rng = np.random.default_rng(1)

    def both_step(step):
        # gradients independent of the parameters: a sign difference can come only from the optimizers
        grads = {n: rng.normal(size=tuple(p.shape)).astype(np.float32) for n, p in sae.named_parameters()}
        for n, p in sae.named_parameters():
            p.grad = torch.from_numpy(grads[n])
        t_opt.step(_lr(step))
        t_opt.zero_grad()
        m_opt.step({n: mx.array(g) for n, g in grads.items()}, _lr(step), step + 1)

    def assert_close(what):
        m_params = m_opt.params
        for n, p in sae.named_parameters():
            ref = p.detach().numpy()
            np.testing.assert_allclose(np.array(m_params[n]), ref, rtol=0, atol=2e-6 * np.abs(ref).max(),
                                       err_msg=f"{what}: {n}")

    for step in range(60):
        both_step(step)
        assert_close(f"step {step}")
    t_opt.eval()
    m_opt.eval()
    assert_close("eval point")
    t_state, m_state = t_opt.state_tensors(), m_opt.state_tensors()
    assert set(t_state) == set(m_state)
    for key in t_state:
        np.testing.assert_allclose(np.asarray(m_state[key]), t_state[key].numpy(), rtol=1e-6, atol=1e-6, err_msg=key)
    t_opt.train()
    m_opt.train()
    assert_close("train point after eval/train")

    # cross-backend resume: each backend loads the other's state (and continues with the other's parameters)
    t_saved = {k: v.clone() for k, v in t_opt.state_tensors().items()}
    m_saved = {k: np.array(v) for k, v in m_opt.state_tensors().items()}
    t_opt.load_state_tensors({k: torch.from_numpy(np.array(v)) for k, v in m_saved.items()})
    m_opt.load_state_tensors({k: v.numpy() for k, v in t_saved.items()})
    assert m_opt.k == t_opt.k == 60 and m_opt.weight_sum == t_opt.weight_sum
    for n in names:
        np.testing.assert_array_equal(np.array(m_opt.params[n]), t_saved[f"optimizer.{n}.y"].numpy())
    for step in range(60, 80):
        both_step(step)
        assert_close(f"step {step} after swapping states")


def test_old_momentum_signum_state_is_refused(tmp_path):
    """A training state of the plain sign-SGD with momentum that signum was before state version 2 is not resumed
    as schedule-free: a one-line CheckpointError (a UserError: the CLI prints it and exits 2)."""
    from sae_core.checkpoint import save_safetensors_numpy
    from sae_core.errors import CheckpointError
    from sae_core.training_state import FORMAT, read_coder_state

    shapes = {"W_dec": (8, 4), "b_dec": (4,)}
    old = {f"optimizer.{p}.momentum": np.zeros(s, np.float32) for p, s in shapes.items()}
    old |= {"tokens_since_fired": np.zeros(8, np.int64), "fire_count": np.zeros(8, np.int64)}
    save_safetensors_numpy(tmp_path / "state.safetensors", old,
                           {"format": FORMAT, "version": "1", "optimizer": "signum", "step": "3"})
    with pytest.raises(CheckpointError, match="old signum.*schedule-free.*start a new run"):
        read_coder_state(tmp_path, "signum", shapes)
