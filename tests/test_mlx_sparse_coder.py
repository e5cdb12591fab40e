"""sae_mlx.SparseCoder against the float64 oracle (docs/SPEC.md sections 2 and 4), on every config variant;
compile == eager."""
from dataclasses import replace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import sae_mlx.sparse_coder as sc  # noqa: E402
from parity.compare import compare_with_oracle  # noqa: E402
from parity.fixtures import all_cases, make_case  # noqa: E402
from parity.oracle import evaluate  # noqa: E402
from parity.runners import LOSS_AUXK_ALPHA, _mx_np, run_mlx  # noqa: E402
from sae_core.config import SparseCoderConfig  # noqa: E402
from sae_core.loop import total_loss  # noqa: E402
from sae_mlx import SparseCoder  # noqa: E402

CASES = all_cases(seed=3)
BF16_CASES = [c for c in CASES if c.name.endswith(("dead_none", "dead_many"))]


def oracle_for(case, params, selection=None, auxk_alpha=LOSS_AUXK_ALPHA):
    return evaluate(params, case.x, case.y, **case.oracle_kwargs(), auxk_alpha=auxk_alpha, selection=selection)


def check_against_oracle(case, dtype, coder_cls=None):
    outputs, selection, params = run_mlx(case, dtype, coder_cls=coder_cls)
    # the oracle sees exactly what the backend saw: inputs and parameters rounded to its dtype
    rounded = case if dtype == "float32" else _rounded(case, dtype)
    ref = oracle_for(rounded, params, selection)
    own = oracle_for(rounded, params)
    checks = compare_with_oracle(outputs, ref, own, dtype=dtype, activation=case.cfg.activation, k=case.cfg.k,
                                 dead_mask=case.dead_mask)
    failed = [f"{c.quantity}: {c.error:.3g} > {c.ceiling:.3g}" for c in checks if not c.ok]
    assert not failed, failed


def _rounded(case, dtype):
    cast = lambda a: None if a is None else _mx_np(mx.array(a).astype(getattr(mx, dtype)))
    return replace(case, x=cast(case.x), y=cast(case.y))


def load_case(case, dtype=mx.float32):
    sae = SparseCoder(case.d_in, case.cfg, dtype=dtype, d_out=case.d_out)
    sae.load_weights([(n, mx.array(v).astype(dtype)) for n, v in case.params.items()])
    return sae


def case_inputs(case):
    x = mx.array(case.x)
    y = None if case.y is None else mx.array(case.y)
    dead = None if case.dead_mask is None else mx.array(case.dead_mask)
    return x, y, dead


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32_matches_oracle(case):
    check_against_oracle(case, "float32")


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_matches_oracle(case):
    check_against_oracle(case, "bfloat16")


@pytest.mark.parametrize("case", [c for c in CASES if c.dead_mask is not None and not c.cfg.skip_connection],
                         ids=lambda c: c.name)
def test_fixed_size_auxk_matches_oracle(case, monkeypatch):
    """The AuxK used inside mx.compile (d_out // 2 slots, those on live latents zeroed), forced in eager mode."""
    monkeypatch.setattr(sc, "_count_dead", lambda dead_mask: None)
    check_against_oracle(case, "float32")


class SparseAuxK(SparseCoder):
    aux_dense_max_ratio = 0  # AuxK through the sparse kernels whatever the number of dead latents


class DenseAuxK(SparseCoder):
    aux_dense_max_ratio = float("inf")  # AuxK as matmuls over the dead rows whatever their number


@pytest.mark.parametrize("coder_cls", [SparseAuxK, DenseAuxK], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", [c for c in CASES if c.cfg.activation == "topk" and c.dead_mask is not None],
                         ids=lambda c: c.name)
def test_both_auxk_paths_match_oracle(case, coder_cls):
    check_against_oracle(case, "float32", coder_cls)


def test_parameter_names_are_sparsifys():
    sae = SparseCoder(10, SparseCoderConfig(num_latents=30, k=3, transcode=True, skip_connection=True), d_out=7)
    shapes = {n: p.shape for n, p in tree_flatten(sae.parameters())}
    assert shapes == {"encoder.weight": (30, 10), "encoder.bias": (30,), "W_dec": (30, 7), "b_dec": (7,),
                      "W_skip": (7, 10)}
    plain = SparseCoder(10, SparseCoderConfig(num_latents=30, k=3))
    assert sorted(n for n, _ in tree_flatten(plain.parameters())) == ["W_dec", "b_dec", "encoder.bias",
                                                                       "encoder.weight"]
    assert plain.W_skip is None
    assert (plain.d_in, plain.d_out, plain.num_latents, plain.dtype) == (10, 10, 30, mx.float32)


def test_auxk_without_b_dec_double_count():
    """AuxK's e_hat has no b_dec: the buggy formulation (e_hat + b_dec) differs by far more than the tolerance."""
    case = make_case(dead="many", seed=5)
    outputs, selection, params = run_mlx(case)
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
    # and b_dec gets no gradient from AuxK beyond the one through x' = x - b_dec (the oracle's)
    np.testing.assert_allclose(outputs["grads"]["b_dec"], ref.grads["b_dec"],
                               atol=1e-4 * np.abs(ref.grads["b_dec"]).max(), rtol=0)


def test_auxk_gives_the_encoder_the_oracles_gradient():
    case = make_case(dead="many", seed=6)
    sae = load_case(case)
    x, _, dead = case_inputs(case)
    _, grads = nn.value_and_grad(sae, lambda m: m(x, dead_mask=dead).auxk_loss)(sae)
    with_aux = evaluate(case.params, case.x, k=case.cfg.k, dead_mask=case.dead_mask, auxk_alpha=1.0)
    without = evaluate(case.params, case.x, k=case.cfg.k, dead_mask=case.dead_mask, auxk_alpha=0.0)
    expected = with_aux.grads["encoder.weight"] - without.grads["encoder.weight"]
    got = _mx_np(grads["encoder"]["weight"])
    assert np.abs(expected).max() > 1e-3  # AuxK really trains the encoder...
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()  # ...exactly as the oracle says
    assert np.abs(got[~case.dead_mask]).max() == 0  # and only the dead latents' rows


@pytest.mark.parametrize("path", ["sparse", "dense", "fixed-size"])
def test_auxk_raise_only_gives_the_oracles_clipped_gradient(path, monkeypatch):
    """As sae_torch's: with auxk_raise_only AuxK's gradient at its activations is min(g, 0) on every AuxK path
    (the fixed-size one is what mx.compile runs)."""
    case = make_case(dead="few", seed=6)
    sae = {"sparse": SparseAuxK, "dense": DenseAuxK, "fixed-size": SparseCoder}[path](
        case.d_in, case.cfg, d_out=case.d_out)
    sae.load_weights([(n, mx.array(v)) for n, v in case.params.items()])
    sae.auxk_raise_only = True
    if path == "fixed-size":
        monkeypatch.setattr(sc, "_count_dead", lambda dead_mask: None)
    x, _, dead = case_inputs(case)
    _, grads = nn.value_and_grad(sae, lambda m: m(x, dead_mask=dead).auxk_loss)(sae)
    kw = dict(k=case.cfg.k, dead_mask=case.dead_mask)
    clipped = evaluate(case.params, case.x, auxk_alpha=1.0, auxk_raise_only=True, **kw).grads
    exact = evaluate(case.params, case.x, auxk_alpha=1.0, **kw).grads
    without = evaluate(case.params, case.x, auxk_alpha=0.0, **kw).grads
    got = {"encoder.weight": _mx_np(grads["encoder"]["weight"]), "encoder.bias": _mx_np(grads["encoder"]["bias"]),
           "W_dec": _mx_np(grads["W_dec"])}
    for name, grad in got.items():
        expected, full = clipped[name] - without[name], exact[name] - without[name]
        assert np.abs(grad - expected).max() <= 1e-4 * np.abs(expected).max(), name
        clipping_changed_it = np.abs(expected - full).max() > 0.1 * np.abs(expected).max()
        assert clipping_changed_it == name.startswith("encoder"), name
    assert (got["encoder.bias"] <= 0).all() and (got["encoder.bias"] < 0).any()


def test_zero_valued_selections_pass_no_gradient():
    # k larger than the number of positive pre-activations: some chosen slots hold 0
    mx.random.seed(0)
    cfg = SparseCoderConfig(num_latents=40, k=30)
    sae = SparseCoder(8, cfg)
    sae.encoder.bias = mx.full((40,), -0.3)
    x = mx.random.normal((5, 8))
    out = sae(x)
    acts, indices = _mx_np(out.latent_acts), _mx_np(out.latent_indices)
    assert (acts == 0).any()
    _, grads = nn.value_and_grad(sae, lambda m: m(x).fvu)(sae)
    grad = _mx_np(grads["encoder"]["weight"])
    zero_rows = np.ones(40, dtype=bool)
    zero_rows[indices[acts > 0]] = False
    assert np.abs(grad[zero_rows]).max() == 0
    assert np.abs(grad[~zero_rows]).max() > 0


def test_multi_topk_keeps_the_k_outputs():
    """Multi-TopK adds a loss; sae_out, latent_acts, latent_indices and fvu stay the k versions."""
    case = make_case(multi_topk=True, dead="none", seed=7)
    with_multi, _, _ = run_mlx(case)
    without, _, _ = run_mlx(replace(case, cfg=replace(case.cfg, multi_topk=False)))
    assert with_multi["latent_indices"].shape == (len(case.x), case.cfg.k)
    for name in ("sae_out", "latent_acts", "latent_indices", "fvu"):
        np.testing.assert_array_equal(with_multi[name], without[name])
    assert with_multi["multi_topk_fvu"] > 0 and without["multi_topk_fvu"] == 0


def test_no_dead_latents_means_no_auxk():
    case = make_case(dead="none", seed=8)
    sae = load_case(case)
    x, _, _ = case_inputs(case)
    plain = sae(x)
    with_mask = sae(x, dead_mask=mx.zeros((case.num_latents,), dtype=mx.bool_))
    assert float(with_mask.auxk_loss) == 0.0 and float(plain.auxk_loss) == 0.0
    assert float(with_mask.fvu) == float(plain.fvu)


def test_encode_decode_agree_with_forward():
    case = make_case(transcode=True, skip_connection=False, dead="none", seed=9)
    sae = load_case(case)
    x, y, _ = case_inputs(case)
    enc = sae.encode(x)
    out = sae(x, y)
    assert enc.pre_acts.shape == (len(case.x), case.num_latents)
    assert np.array_equal(_mx_np(enc.top_indices), _mx_np(out.latent_indices))
    np.testing.assert_array_equal(_mx_np(sae.decode(enc.top_acts, enc.top_indices)), _mx_np(out.sae_out))
    np.testing.assert_allclose(_mx_np(enc.top_acts),
                               np.take_along_axis(_mx_np(enc.pre_acts), _mx_np(enc.top_indices), axis=1),
                               rtol=1e-5, atol=1e-6)


def test_init_follows_spec():
    mx.random.seed(0)
    sae = SparseCoder(50, SparseCoderConfig(expansion_factor=4, k=4))
    w = _mx_np(sae.encoder.weight)
    bound = 1 / np.sqrt(50)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert (_mx_np(sae.encoder.bias) == 0).all() and (_mx_np(sae.b_dec) == 0).all()
    w_dec = _mx_np(sae.W_dec)
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), np.ones(200), rtol=1e-5)
    np.testing.assert_allclose(w_dec, w / np.linalg.norm(w, axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    transcoder = SparseCoder(50, SparseCoderConfig(expansion_factor=4, k=4, transcode=True, skip_connection=True),
                             d_out=30)
    assert transcoder.W_dec.shape == (200, 30) and (_mx_np(transcoder.W_dec) == 0).all()
    assert transcoder.W_skip.shape == (30, 50) and (_mx_np(transcoder.W_skip) == 0).all()
    half = SparseCoder(16, SparseCoderConfig(num_latents=32, k=4), dtype=mx.bfloat16)
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(half.parameters()))


def test_decoder_norm_utilities():
    sae = SparseCoder(12, SparseCoderConfig(num_latents=30, k=3))
    sae.W_dec = sae.W_dec * (mx.random.uniform(shape=(30, 1)) + 0.5)
    sae.set_decoder_norm_to_unit_norm()
    np.testing.assert_allclose(np.linalg.norm(_mx_np(sae.W_dec), axis=1), np.ones(30), rtol=1e-5)
    x = mx.random.normal((9, 12))
    _, grads = nn.value_and_grad(sae, lambda m: m(x).fvu)(sae)  # the nested tree value_and_grad gives
    projected = sae.remove_gradient_parallel_to_decoder_directions(grads)
    assert projected["encoder"] is grads["encoder"] and projected["b_dec"] is grads["b_dec"]
    np.testing.assert_allclose(_mx_np((projected["W_dec"] * sae.W_dec).sum(axis=1)), np.zeros(30), atol=1e-6)
    flat = {"W_dec": mx.random.normal((30, 12))}  # a flat dict by parameter name works too
    g = _mx_np(flat["W_dec"])
    w = _mx_np(sae.W_dec)
    expected = g - (g * w).sum(1, keepdims=True) / (w * w).sum(1, keepdims=True) * w
    np.testing.assert_allclose(_mx_np(sae.remove_gradient_parallel_to_decoder_directions(flat)["W_dec"]),
                               expected, atol=1e-6)


# ---- mx.compile: a compiled training step gives the eager step's loss, gradients and update ----

COMPILE_CASES = [make_case(dead="few", seed=11),
                 make_case(activation="groupmax", transcode=True, skip_connection=True, multi_topk=True,
                           dead="many", seed=12),
                 make_case(multi_topk=True, dead="all", seed=13)]


def _loss_fn(model, x, y, dead):
    out = model(x, y, dead_mask=dead)
    return total_loss(out.fvu, out.auxk_loss, out.multi_topk_fvu, LOSS_AUXK_ALPHA)


def _flat(tree):
    return {n: _mx_np(v) for n, v in tree_flatten(tree)}


def _assert_trees_close(got, want, rtol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        scale = max(np.abs(want[name]).max(), 1e-30)
        assert np.abs(got[name] - want[name]).max() <= rtol * scale, name


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.name)
def test_compiled_loss_and_grads_match_eager(case):
    sae = load_case(case)
    x, y, dead = case_inputs(case)
    value_and_grad = nn.value_and_grad(sae, _loss_fn)
    loss, grads = value_and_grad(sae, x, y, dead)
    traces = []

    def traced(x, y, dead):
        traces.append(1)  # runs only while mx.compile traces
        return value_and_grad(sae, x, y, dead)

    # outputs=state too: nn.value_and_grad puts the traced parameters into the module during the trace
    compiled = mx.compile(traced, inputs=sae.state, outputs=sae.state)
    c_loss, c_grads = compiled(x, y, dead)
    assert abs(float(c_loss) - float(loss)) <= 1e-6 * abs(float(loss))
    _assert_trees_close(_flat(c_grads), _flat(grads))
    # one compiled graph serves every number of dead latents (k_aux is not a shape inside compile)
    for count in (0, 1, case.d_out // 2 + 3):
        other = np.zeros(case.num_latents, dtype=bool)
        other[np.random.default_rng(count).choice(case.num_latents, size=count, replace=False)] = True
        loss, grads = value_and_grad(sae, x, y, mx.array(other))
        c_loss, c_grads = compiled(x, y, mx.array(other))
        assert abs(float(c_loss) - float(loss)) <= 1e-6 * abs(float(loss))
        _assert_trees_close(_flat(c_grads), _flat(grads))
    assert len(traces) == 1


def test_compiled_training_step_matches_eager():
    """value_and_grad + decoder-gradient projection + Adam + decoder renormalisation, compiled vs eager."""
    case = COMPILE_CASES[0]
    x, y, dead = case_inputs(case)
    results = []
    for compile_it in (False, True):
        sae = load_case(case)
        opt = optim.Adam(learning_rate=1e-2)
        opt.init(sae.trainable_parameters())
        value_and_grad = nn.value_and_grad(sae, _loss_fn)

        def step(x, dead):
            loss, grads = value_and_grad(sae, x, None, dead)
            opt.update(sae, sae.remove_gradient_parallel_to_decoder_directions(grads))
            sae.set_decoder_norm_to_unit_norm()
            return loss

        if compile_it:
            step = mx.compile(step, inputs=[sae.state, opt.state], outputs=[sae.state, opt.state])
        losses = []
        for _ in range(3):
            losses.append(step(x, dead))
            mx.eval(sae.parameters(), opt.state)
        results.append(([float(v) for v in losses], _flat(sae.parameters())))
    (eager_losses, eager_params), (comp_losses, comp_params) = results
    np.testing.assert_allclose(comp_losses, eager_losses, rtol=1e-5)
    assert eager_losses[-1] < eager_losses[0]
    _assert_trees_close(comp_params, eager_params, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(comp_params["W_dec"], axis=1), 1, rtol=1e-5)


# ---- the int32 guard: dense pre-activations and selection over row chunks ----

def test_row_chunks_cover_every_row_below_the_limit(monkeypatch):
    assert sc.row_chunks(37, 120) == [(0, 37)]
    monkeypatch.setattr(sc, "_DENSE_LIMIT", 7 * 120 + 1)
    chunks = sc.row_chunks(37, 120)
    assert chunks[0] == (0, 7) and chunks[-1] == (35, 37) and len(chunks) == 6
    assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))
    assert all((stop - start) * 120 < sc._DENSE_LIMIT for start, stop in chunks)
    monkeypatch.setattr(sc, "_DENSE_LIMIT", 120)  # N * M == limit must chunk too (one row at a time here)
    assert sc.row_chunks(3, 120) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("case", [make_case(activation="groupmax", multi_topk=True, dead="many", seed=14),
                                  make_case(transcode=True, skip_connection=True, dead="few", seed=15)],
                         ids=lambda c: c.name)
def test_chunked_selection_matches_unchunked(case, monkeypatch):
    whole, whole_sel, _ = run_mlx(case)
    calls = []
    original = sc.SparseCoder.pre_acts
    monkeypatch.setattr(sc.SparseCoder, "pre_acts",
                        lambda self, x_in: calls.append(x_in.shape[0]) or original(self, x_in))
    monkeypatch.setattr(sc, "_DENSE_LIMIT", 5 * case.num_latents)  # 4 rows per chunk
    chunked, chunked_sel, params = run_mlx(case)
    assert calls[:10] == [4] * 9 + [1]  # the forward ran over 10 chunks of rows
    for name in ("latent_indices",):
        assert np.array_equal(np.sort(chunked[name], axis=1), np.sort(whole[name], axis=1))
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-7)
    _assert_trees_close(chunked["grads"], whole["grads"], rtol=1e-6)
    ref = oracle_for(case, params, chunked_sel)
    checks = compare_with_oracle(chunked, ref, oracle_for(case, params), dtype="float32",
                                 activation=case.cfg.activation, k=case.cfg.k, dead_mask=case.dead_mask)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


@pytest.mark.parametrize("dead", ["few", "all"])  # dense-subset and sparse AuxK
def test_input_gradient_and_b_dec_gradient(dead):
    """b_dec's gradient reaches it through the encoder bias (sparse_encoder_inputs), not through x_in: check it,
    and the gradient w.r.t. x, against MLX autograd of the same loss written densely over the same selections."""
    case = make_case(dead=dead, multi_topk=True, seed=12)
    sae = load_case(case)
    sae.b_dec = mx.array(np.random.default_rng(0).normal(size=case.d_out).astype(np.float32))
    x, _, dead_mask = case_inputs(case)
    params = dict(tree_flatten(sae.trainable_parameters()))

    def coder_loss(params, x):
        sae.update(tree_unflatten(list(params.items())))
        out = sae(x, dead_mask=dead_mask)
        return out.fvu + out.auxk_loss + out.multi_topk_fvu

    pre = sae.pre_acts(sae.encoder_input(x))
    selections = (sae(x, dead_mask=dead_mask).latent_indices, sae.aux_indices(pre, dead_mask),
                  sae.multi_topk_indices(pre))
    num_dead = int(dead_mask.sum())
    scale = min(num_dead / (case.d_out // 2), 1.0)

    def dense_loss(params, x):
        pre = mx.maximum((x - params["b_dec"]) @ params["encoder.weight"].T + params["encoder.bias"], 0)
        decode = lambda idx: (mx.take_along_axis(pre, idx, 1)[..., None] * params["W_dec"][idx]).sum(1)
        top, aux, multi = selections
        tv = mx.square(x - x.mean(0)).sum()
        e = x - (decode(top) + params["b_dec"])
        return (mx.square(e).sum() + scale * mx.square(decode(aux) - mx.stop_gradient(e)).sum()
                + mx.square(decode(multi) + params["b_dec"] - x).sum()) / tv

    got = mx.grad(coder_loss, argnums=(0, 1))(params, x)
    want = mx.grad(dense_loss, argnums=(0, 1))(params, x)
    pairs = {name: (got[0][name], want[0][name]) for name in params} | {"x": (got[1], want[1])}
    for name, (g, w) in pairs.items():
        g, w = np.array(g, dtype=np.float64), np.array(w, dtype=np.float64)
        assert np.abs(w).max() > 0, name
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max(), name
