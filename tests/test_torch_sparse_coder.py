"""sae_torch.SparseCoder against the float64 oracle (docs/SPEC.md sections 2 and 4), on every config variant."""
import numpy as np
import pytest
import torch

from parity.compare import compare_with_oracle
from parity.fixtures import all_cases, make_case
from parity.oracle import evaluate
from parity.runners import LOSS_AUXK_ALPHA, run_torch
from sae_core.config import SparseCoderConfig
from sae_torch import SparseCoder

CASES = all_cases(seed=3)
BF16_CASES = [c for c in CASES if c.name.endswith(("dead_none", "dead_many"))]


def oracle_for(case, params, selection=None):
    return evaluate(params, case.x, case.y, **case.oracle_kwargs(), auxk_alpha=LOSS_AUXK_ALPHA, selection=selection)


def check_against_oracle(case, dtype, coder_cls=None):
    outputs, selection, params = run_torch(case, dtype, coder_cls=coder_cls)
    # the oracle sees exactly what the backend saw: inputs and parameters rounded to its dtype
    rounded = case if dtype == "float32" else _rounded(case, dtype)
    ref = oracle_for(rounded, params, selection)
    own = oracle_for(rounded, params)
    checks = compare_with_oracle(outputs, ref, own, dtype=dtype, activation=case.cfg.activation, k=case.cfg.k,
                                 dead_mask=case.dead_mask)
    failed = [f"{c.quantity}: {c.error:.3g} > {c.ceiling:.3g}" for c in checks if not c.ok]
    assert not failed, failed


def _rounded(case, dtype):
    from dataclasses import replace

    cast = lambda a: None if a is None else torch.from_numpy(a).to(getattr(torch, dtype)).float().numpy()
    return replace(case, x=cast(case.x), y=cast(case.y))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32_matches_oracle(case):
    check_against_oracle(case, "float32")


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_matches_oracle(case):
    check_against_oracle(case, "bfloat16")


class SparseAuxK(SparseCoder):
    aux_dense_max_ratio = 0  # AuxK through the sparse kernels whatever the number of dead latents


class DenseAuxK(SparseCoder):
    aux_dense_max_ratio = float("inf")  # AuxK as GEMMs over the dead rows whatever their number


AUX_CASES = [c for c in CASES if c.cfg.activation == "topk" and c.dead_mask is not None]


@pytest.mark.parametrize("coder_cls", [SparseAuxK, DenseAuxK], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", AUX_CASES, ids=lambda c: c.name)
def test_both_auxk_paths_match_oracle(case, coder_cls):
    check_against_oracle(case, "float32", coder_cls)


@pytest.mark.parametrize("dead", ["few", "all"])
def test_auxk_paths_agree(dead):
    """The default ratio takes the dense path for few dead latents and the sparse one when all are dead; either
    way the loss and every gradient agree with the other path."""
    case = make_case(dead=dead, seed=11)
    sparse, _, _ = run_torch(case, coder_cls=SparseAuxK)
    dense, _, _ = run_torch(case, coder_cls=DenseAuxK)
    np.testing.assert_allclose(dense["auxk_loss"], sparse["auxk_loss"], rtol=1e-5)
    for name, grad in sparse["grads"].items():
        np.testing.assert_allclose(dense["grads"][name], grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_auxk_without_b_dec_double_count():
    """AuxK's e_hat has no b_dec: the buggy formulation (e_hat + b_dec) differs by far more than the tolerance."""
    case = make_case(dead="many", seed=5)
    outputs, selection, params = run_torch(case)
    ref = oracle_for(case, params, selection)
    assert abs(outputs["auxk_loss"] - ref.auxk_loss) <= 1e-5 * ref.auxk_loss
    # the bug: e_hat := e_hat + b_dec, i.e. the target becomes e - b_dec
    x, p = case.x.astype(np.float64), {n: v.astype(np.float64) for n, v in params.items()}
    e = x - ref.sae_out
    aux_acts = np.take_along_axis(ref.pre_acts, selection.aux_indices, axis=1)
    e_hat = np.einsum("nk,nkd->nd", aux_acts, p["W_dec"][selection.aux_indices])
    scale = min(case.dead_mask.sum() / (case.d_out // 2), 1.0)
    total_variance = ((x - x.mean(0)) ** 2).sum()
    buggy = scale * ((e_hat + p["b_dec"] - e) ** 2).sum() / total_variance
    assert abs(buggy - ref.auxk_loss) > 100 * 1e-5 * ref.auxk_loss
    assert abs(outputs["auxk_loss"] - buggy) > 100 * 1e-5 * ref.auxk_loss


def test_auxk_gives_the_encoder_the_oracles_gradient():
    case = make_case(dead="many", seed=6)
    sae = SparseCoder(case.d_in, case.cfg, d_out=case.d_out)
    sae.load_state_dict({n: torch.from_numpy(v) for n, v in case.params.items()})
    out = sae(torch.from_numpy(case.x), dead_mask=torch.from_numpy(case.dead_mask))
    out.auxk_loss.backward()
    with_aux = evaluate(case.params, case.x, k=case.cfg.k, dead_mask=case.dead_mask, auxk_alpha=1.0)
    without = evaluate(case.params, case.x, k=case.cfg.k, dead_mask=case.dead_mask, auxk_alpha=0.0)
    expected = with_aux.grads["encoder.weight"] - without.grads["encoder.weight"]
    got = sae.encoder.weight.grad.numpy()
    assert np.abs(expected).max() > 1e-3  # AuxK really trains the encoder...
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()  # ...exactly as the oracle says
    assert np.abs(got[~case.dead_mask]).max() == 0  # and only the dead latents' rows


@pytest.mark.parametrize("coder_cls", [SparseAuxK, DenseAuxK], ids=["sparse", "dense"])
def test_auxk_raise_only_gives_the_oracles_clipped_gradient(coder_cls):
    """With auxk_raise_only (the trainer's default) AuxK's gradient at its activations is min(g, 0): the encoder
    gets the oracle's clipped gradient on both paths, a descent step can only raise the dead latents' biases, and
    the decoder's AuxK gradient is the exact one."""
    case = make_case(dead="few", seed=6)
    sae = coder_cls(case.d_in, case.cfg, d_out=case.d_out)
    sae.auxk_raise_only = True
    sae.load_state_dict({n: torch.from_numpy(v) for n, v in case.params.items()})
    num_dead = int(case.dead_mask.sum())
    assert sae.aux_takes_dense_path(num_dead, min(case.d_out // 2, num_dead)) == (coder_cls is DenseAuxK)
    sae(torch.from_numpy(case.x), dead_mask=torch.from_numpy(case.dead_mask)).auxk_loss.backward()
    kw = dict(k=case.cfg.k, dead_mask=case.dead_mask)
    clipped = evaluate(case.params, case.x, auxk_alpha=1.0, auxk_raise_only=True, **kw).grads
    exact = evaluate(case.params, case.x, auxk_alpha=1.0, **kw).grads
    without = evaluate(case.params, case.x, auxk_alpha=0.0, **kw).grads
    got = {"encoder.weight": sae.encoder.weight.grad, "encoder.bias": sae.encoder.bias.grad, "W_dec": sae.W_dec.grad}
    for name, grad in got.items():
        expected, full = clipped[name] - without[name], exact[name] - without[name]
        assert np.abs(grad.numpy() - expected).max() <= 1e-4 * np.abs(expected).max(), name
        clipping_changed_it = np.abs(expected - full).max() > 0.1 * np.abs(expected).max()
        assert clipping_changed_it == name.startswith("encoder"), name
    assert (got["encoder.bias"] <= 0).all() and (got["encoder.bias"] < 0).any()


def test_zero_valued_selections_pass_no_gradient():
    # k larger than the number of positive pre-activations: some chosen slots hold 0
    cfg = SparseCoderConfig(num_latents=40, k=30)
    sae = SparseCoder(8, cfg)
    x = torch.randn(5, 8)
    with torch.no_grad():
        sae.encoder.bias.fill_(-0.3)
    out = sae(x)
    assert (out.latent_acts == 0).any()
    out.fvu.backward()
    zero_rows = torch.ones(40, dtype=torch.bool)
    zero_rows[out.latent_indices[out.latent_acts > 0]] = False
    assert sae.encoder.weight.grad[zero_rows].abs().max() == 0
    assert sae.encoder.weight.grad[~zero_rows].abs().max() > 0


def test_multi_topk_keeps_the_k_outputs():
    """Multi-TopK adds a loss; sae_out, latent_acts, latent_indices and fvu stay the k versions."""
    from dataclasses import replace

    case = make_case(multi_topk=True, dead="none", seed=7)
    with_multi, _, _ = run_torch(case)
    without, _, _ = run_torch(replace(case, cfg=replace(case.cfg, multi_topk=False)))
    assert with_multi["latent_indices"].shape == (len(case.x), case.cfg.k)
    for name in ("sae_out", "latent_acts", "latent_indices", "fvu"):
        np.testing.assert_array_equal(with_multi[name], without[name])
    assert with_multi["multi_topk_fvu"] > 0 and without["multi_topk_fvu"] == 0


def test_init_follows_spec():
    torch.manual_seed(0)
    sae = SparseCoder(50, SparseCoderConfig(expansion_factor=4, k=4))
    bound = 1 / np.sqrt(50)
    assert sae.encoder.weight.abs().max() <= bound and sae.encoder.weight.abs().max() > 0.9 * bound
    assert (sae.encoder.bias == 0).all() and (sae.b_dec == 0).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(200))
    torch.testing.assert_close(sae.W_dec, sae.encoder.weight / sae.encoder.weight.norm(dim=1, keepdim=True))
    transcoder = SparseCoder(50, SparseCoderConfig(expansion_factor=4, k=4, transcode=True, skip_connection=True),
                             d_out=30)
    assert transcoder.W_dec.shape == (200, 30) and (transcoder.W_dec == 0).all()
    assert transcoder.W_skip.shape == (30, 50)


def test_decoder_norm_utilities():
    sae = SparseCoder(12, SparseCoderConfig(num_latents=30, k=3))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(30, 1) + 0.5)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(30))
    sae.W_dec.grad = torch.randn(30, 12)
    sae.remove_gradient_parallel_to_decoder_directions()  # sparsify's call: the .grad attributes, in place
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(dim=1), torch.zeros(30), atol=1e-6, rtol=0)
    # the call both backends share: gradients by name in, gradients by name out (MLX's arrays are immutable)
    grads = {"W_dec": torch.randn(30, 12), "b_dec": torch.randn(12)}
    b_dec_grad = grads["b_dec"]
    out = sae.remove_gradient_parallel_to_decoder_directions(grads)
    assert out["b_dec"] is b_dec_grad
    torch.testing.assert_close((out["W_dec"] * sae.W_dec).sum(dim=1), torch.zeros(30), atol=1e-6, rtol=0)


def test_parity_fixtures_cover_both_auxk_paths():
    """The parity suite runs the coder as users get it: its fixtures must reach the dense-subset AuxK (few dead)
    and the sparse one (all dead) with the default `aux_dense_max_ratio`, in both backends."""
    from sae_mlx import SparseCoder as MLXSparseCoder

    assert MLXSparseCoder.aux_dense_max_ratio == SparseCoder.aux_dense_max_ratio
    assert MLXSparseCoder.aux_dense_max_fraction == SparseCoder.aux_dense_max_fraction
    paths = set()
    for case in CASES:
        if case.dead_mask is not None:
            num_dead = int(case.dead_mask.sum())
            k_aux = min(case.d_out // 2, num_dead)
            sae = SparseCoder(case.d_in, case.cfg, d_out=case.d_out)
            paths.add("dense" if sae.aux_takes_dense_path(num_dead, k_aux) else "sparse")
    assert paths == {"dense", "sparse"}


@pytest.mark.parametrize("dead", ["few", "all"])  # dense-subset and sparse AuxK
def test_input_gradient_and_b_dec_gradient(dead):
    """b_dec's gradient reaches it through the encoder bias (sparse_encoder_inputs), not through x_in: check it,
    and the gradient w.r.t. x when the caller asks for one, against plain dense autograd of the same loss."""
    case = make_case(dead=dead, multi_topk=True, seed=12)
    sae = SparseCoder(case.d_in, case.cfg, dtype=torch.float64, d_out=case.d_out)
    sae.load_state_dict({n: torch.from_numpy(v).double() for n, v in case.params.items()})
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.from_numpy(case.x).double().requires_grad_()
    dead_mask = torch.from_numpy(case.dead_mask)
    out = sae(x, dead_mask=dead_mask)
    (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()

    # the same loss with dense autograd over the same selections
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    pre = torch.relu((x_ref - params["b_dec"]) @ params["encoder.weight"].T + params["encoder.bias"])
    idx = out.latent_indices
    with torch.no_grad():
        aux_idx = sae.aux_indices(pre, dead_mask)
        multi_idx = sae.multi_topk_indices(pre)

    def decode(indices):
        return torch.einsum("nk,nkd->nd", pre.gather(1, indices), params["W_dec"][indices])

    sae_out = decode(idx) + params["b_dec"]
    tv = (x_ref - x_ref.mean(0)).pow(2).sum()
    e = x_ref - sae_out
    num_dead = int(dead_mask.sum())
    scale = min(num_dead / (case.d_out // 2), 1.0)
    loss = (e.pow(2).sum() + scale * (decode(aux_idx) - e.detach()).pow(2).sum()
            + (decode(multi_idx) + params["b_dec"] - x_ref).pow(2).sum()) / tv
    loss.backward()
    # float64 parameters, but the coder sums its losses in fp32 (as in training): fp32-level agreement
    grads = {name: (p.grad, params[name].grad) for name, p in sae.named_parameters()} | {"x": (x.grad, x_ref.grad)}
    for name, (got, want) in grads.items():
        assert want.abs().max() > 0, name
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
