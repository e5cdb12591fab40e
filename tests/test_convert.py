"""`sae convert` (sae_core/convert.py, sae_core/saelens.py): every direction, refusals, atomicity, the CLI.

The SAELens side is checked three ways: against a NumPy forward written here from SAELens's code (topk on the raw
pre-activation then ReLU, decoder-norm rescaling, apply_b_dec_to_input), against the float64 oracle on the same
parameters, and against sae-lens itself in `test_real_sae_lens` when it can be imported here or when the environment
variable SAE_LENS_PYTHON names a Python that has it. sae-lens is not a dependency: it pulls transformer-lens,
transformers, datasets, ... (6.54.12: about 2.5 min to install beside torch==2.13.0 CPU, 12-18 s to import), so that
test runs it once in a subprocess and skips when neither is available.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from parity.fixtures import make_case
from parity.oracle import Selection, evaluate
from sae_core import convert as conv
from sae_core import saelens
from sae_core.checkpoint import load_checkpoint_numpy, load_safetensors_numpy, read_header, save_safetensors_numpy
from sae_core.errors import CheckpointError, UserError
from sae_core.reference import SparseCoderReference, select_indices

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "data" / "convert" / "saelens_probe.py"

CASES = {
    "sae": dict(),
    "sae-multi": dict(multi_topk=True),
    "transcoder": dict(transcode=True),  # d_in 23, d_out 19
    "skip-transcoder": dict(transcode=True, skip_connection=True),
}


def case(name, **changes):
    return make_case(**{**CASES.get(name, {}), **changes})


def write_case(tmp_path, name, **changes):
    c = case(name, **changes)
    return c, c.write(tmp_path / f"src-{name}")


def no_leftovers(parent: Path):
    """No hidden staging or backup folders were left next to the destination."""
    return not [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith((".partial", ".old"))]


# ---- independent references ----

def saelens_forward(cfg: dict, t: dict, x: np.ndarray):
    """SAELens's inference forward, from its source (TopKSAE / Transcoder / SkipTranscoder), in float64: dense
    feature activations [N, d_sae] and the output."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True) if cfg["architecture"] == "topk" else x
    hidden = sae_in @ t["W_enc"] + t["b_enc"]
    norms = np.linalg.norm(t["W_dec"], axis=-1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden = hidden * norms
    idx = np.argsort(-hidden, axis=1, kind="stable")[:, : cfg["k"]]
    feats = np.zeros_like(hidden)
    np.put_along_axis(feats, idx, np.maximum(np.take_along_axis(hidden, idx, axis=1), 0), axis=1)
    acts = feats / norms if cfg.get("rescale_acts_by_decoder_norm") else feats
    out = acts @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return feats, out


def _target(x, params):
    """Any target of the right width: only the forward is compared, not the losses."""
    return np.random.default_rng(0).normal(size=(len(x), params["b_dec"].shape[0]))


def oracle_dense(cfg, params, x):
    res = evaluate(params, x, _target(x, params), activation=cfg.activation, k=cfg.k, transcode=cfg.transcode,
                   grads=False)
    dense = np.zeros((len(x), params["encoder.weight"].shape[0]))
    np.put_along_axis(dense, res.latent_indices, res.latent_acts, axis=1)
    return dense, res.sae_out


def assert_close(got, ref, rel):
    err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max|diff| = {err:.2e} x max|ref| > {rel:.0e}"


def native_saelens(folder: Path, *, architecture="topk", d_in=23, d_sae=120, k=6, d_out=None, rescale=False,
                   apply_b_dec=True, seed=3, extra_cfg=None, extra_tensors=None, pre6=False):
    """A SAELens-layout folder as SAELens 6 writes it (or a pre-6.0 flat config), random weights with decoder row
    norms far from 1 and b_dec != 0."""
    rng = np.random.default_rng(seed)
    d_out = d_in if d_out is None else d_out
    t = {"W_enc": rng.normal(scale=d_in ** -0.5, size=(d_in, d_sae)), "b_enc": rng.normal(scale=0.05, size=d_sae),
         "W_dec": rng.normal(size=(d_sae, d_out)) * rng.uniform(0.25, 2.25, size=(d_sae, 1)),
         "b_dec": rng.normal(scale=0.3, size=d_out)}
    t = {name: v.astype(np.float32) for name, v in t.items()}
    t.update(extra_tensors or {})
    if pre6:
        cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "hook_point": "blocks.3.hook_resid_post", "model_name": "gpt2", "activation_fn_str": "topk",
               "activation_fn_kwargs": {"k": k}, "apply_b_dec_to_input": apply_b_dec, "normalize_activations": False}
    else:
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2",
                            "hook_name": "blocks.3.hook_resid_post"},
               "k": k, "rescale_acts_by_decoder_norm": rescale, "architecture": architecture}
        if architecture != "topk":
            cfg["d_out"] = d_out
    cfg.update(extra_cfg or {})
    folder.mkdir(parents=True)
    save_safetensors_numpy(folder / saelens.WEIGHTS_FILE, t)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg, t


def test_module_reference_matches_oracle():
    """The float64 forward that proves every conversion is the oracle's (one reference, chunked over latents)."""
    for kw in (dict(activation="groupmax"), dict(transcode=True, skip_connection=True), dict()):
        c = make_case(**kw)
        ref = SparseCoderReference(c.cfg, c.params, chunk=50)
        x = conv.make_batch(ref, c.d_in)
        pre = ref.pre_acts(x)
        idx = select_indices(pre, c.cfg.activation, c.cfg.k)
        res = evaluate(c.params, x, _target(x, c.params), activation=c.cfg.activation, k=c.cfg.k,
                       transcode=c.cfg.transcode, selection=Selection(idx), grads=False)
        np.testing.assert_allclose(pre, res.pre_acts, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ref.decode(x, idx, np.take_along_axis(pre, idx, 1)), res.sae_out, rtol=1e-12,
                                   atol=1e-12)
        assert (pre > 0).any(axis=0).mean() > 0.8, "the proof batch should switch on most latents"


# ---- ours -> SAELens ----

@pytest.mark.parametrize("name", ["sae", "transcoder", "skip-transcoder"])
def test_to_saelens_layout_and_function(tmp_path, name):
    c, src = write_case(tmp_path, name)
    (report,) = conv.convert(src, tmp_path / "out", to="saelens")
    assert report.verified and report.tolerance == 1e-4 and max(report.errors.values()) <= 1e-6
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    t, _ = load_safetensors_numpy(tmp_path / "out" / "sae_weights.safetensors")
    m = c.num_latents
    assert cfg["d_in"] == c.d_in and cfg["d_sae"] == m and cfg["k"] == c.cfg.k and cfg["dtype"] == "float32"
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"].startswith("6.")
    shapes = {"W_enc": (c.d_in, m), "b_enc": (m,), "W_dec": (m, c.d_out), "b_dec": (c.d_out,)}
    if name == "sae":
        assert cfg["architecture"] == "topk" and cfg["apply_b_dec_to_input"] is True
        assert cfg["rescale_acts_by_decoder_norm"] is False and "d_out" not in cfg
    else:
        assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == c.d_out == 19 != c.d_in
        assert cfg["architecture"] == ("topk_skip_transcoder" if "skip" in name else "topk_transcoder")
    if "skip" in name:
        shapes["W_skip"] = (c.d_out, c.d_in)
    assert {n: v.shape for n, v in t.items()} == shapes
    feats, out = saelens_forward(cfg, t, c.x.astype(np.float64))
    dense, sae_out = oracle_dense(c.cfg, c.params, c.x)
    assert_close(feats, dense, 1e-6)
    assert_close(out, sae_out, 1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact(tmp_path, name):
    c, src = write_case(tmp_path, name)
    conv.convert(src, tmp_path / "sl", to="saelens")
    conv.convert(tmp_path / "sl", tmp_path / "back", to="sparsify")
    conv.convert(tmp_path / "back", tmp_path / "sl2", to="saelens")
    cfg0, d_in0, d_out0, t0 = load_checkpoint_numpy(src)
    cfg1, d_in1, d_out1, t1 = load_checkpoint_numpy(tmp_path / "back")
    assert (cfg1, d_in1, d_out1) == (cfg0, d_in0, d_out0)  # multi_topk, normalize_decoder, ... included
    assert set(t1) == set(t0)
    for key in t0:
        assert t1[key].dtype == t0[key].dtype and t1[key].tobytes() == t0[key].tobytes(), key
    sl, _ = load_safetensors_numpy(tmp_path / "sl" / "sae_weights.safetensors")
    sl2, _ = load_safetensors_numpy(tmp_path / "sl2" / "sae_weights.safetensors")
    assert all(sl[key].tobytes() == sl2[key].tobytes() for key in sl) and set(sl) == set(sl2)
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert json.loads((tmp_path / "sl2" / "cfg.json").read_text()) == meta
    assert meta["metadata"]["sparsify"]["multi_topk"] is (name == "sae-multi")


# ---- SAELens -> ours ----

@pytest.mark.parametrize("variant", ["plain", "rescale", "no_b_dec", "rescale_no_b_dec", "pre6", "transcoder",
                                     "skip_transcoder"])
def test_from_saelens(tmp_path, variant):
    kwargs = {"plain": {}, "rescale": dict(rescale=True), "no_b_dec": dict(apply_b_dec=False),
              "rescale_no_b_dec": dict(rescale=True, apply_b_dec=False), "pre6": dict(pre6=True),
              "transcoder": dict(architecture="topk_transcoder", d_out=17, apply_b_dec=False),
              "skip_transcoder": dict(architecture="topk_skip_transcoder", d_out=17, apply_b_dec=False,
                                      extra_tensors={"W_skip": np.full((17, 23), 0.01, np.float32)})}[variant]
    cfg, t = native_saelens(tmp_path / "native", **kwargs)
    (report,) = conv.convert(tmp_path / "native", tmp_path / "ours", to="sparsify")
    assert report.verified and report.source_format == "saelens"
    ours_cfg, d_in, d_out, params = load_checkpoint_numpy(tmp_path / "ours")
    assert ours_cfg.activation == "topk" and ours_cfg.k == 6 and ours_cfg.num_latents_for(d_in) == 120
    assert ours_cfg.transcode == ("transcoder" in variant) and ours_cfg.skip_connection == ("skip" in variant)
    assert d_out == (17 if "transcoder" in variant else 23)
    if "rescale" in variant:  # folded: unit decoder rows, as sparsify's normalize_decoder keeps them
        np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1, atol=1e-6)
        assert ours_cfg.normalize_decoder and any("rescale" in note for note in report.notes)
    if "no_b_dec" in variant:
        assert any("apply_b_dec_to_input" in note for note in report.notes)
    x = make_case().x.astype(np.float64)
    norm_cfg = dict(cfg, architecture=cfg["architecture"] if variant != "pre6" else "topk", k=6)
    feats, out = saelens_forward(norm_cfg, t, x)
    dense, sae_out = oracle_dense(ours_cfg, params, x)
    assert_close(dense, feats, 1e-5)
    assert_close(sae_out, out, 1e-5)
    data = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert data["saelens"]["architecture"] == cfg["architecture"] if variant != "pre6" else "topk"


def test_loads_and_runs_in_sae_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from sae_torch import SparseCoder

    cfg, t = native_saelens(tmp_path / "native", rescale=True)
    conv.convert(tmp_path / "native", tmp_path / "ours", to="sparsify")
    conv.convert(tmp_path / "native", tmp_path / "ours-bf16", to="sparsify", dtype="bf16")
    x = make_case().x
    feats, out = saelens_forward(cfg, t, x.astype(np.float64))
    sae = SparseCoder.load_from_disk(tmp_path / "ours")
    assert sae.dtype == torch.float32
    with torch.no_grad():
        res = sae(torch.from_numpy(x))
    dense = np.zeros_like(feats)
    np.put_along_axis(dense, res.latent_indices.long().numpy(), res.latent_acts.numpy(), axis=1)
    assert_close(dense, feats, 1e-5)
    assert_close(res.sae_out.numpy(), out, 1e-5)

    # bf16: compared as docs/SPEC.md section 4 says, with the oracle on the bf16 weights and inputs and torch's own
    # selection
    sae = SparseCoder.load_from_disk(tmp_path / "ours-bf16")
    assert sae.dtype == torch.bfloat16
    x16 = torch.from_numpy(x).to(torch.bfloat16)
    with torch.no_grad():
        res = sae(x16)
    cfg16, _, _, params16 = load_checkpoint_numpy(tmp_path / "ours-bf16")
    ref = evaluate(params16, x16.float().numpy(), activation="topk", k=cfg16.k,
                   selection=Selection(res.latent_indices.long().numpy()), grads=False)
    assert_close(res.sae_out.float().numpy(), ref.sae_out, 2e-2)
    assert_close(res.latent_acts.float().numpy(), ref.latent_acts, 2e-2)


def test_loads_and_runs_in_sae_mlx(tmp_path):
    try:
        import mlx.core as mx

        from sae_mlx import SparseCoder
    except Exception as error:  # noqa: BLE001 (not installed, or the backend is not there yet)
        pytest.skip(f"sae_mlx.SparseCoder is not importable here: {error!r}")
    for name in ("sae", "transcoder"):
        cfg, t = native_saelens(tmp_path / f"native-{name}", **(
            dict(rescale=True) if name == "sae" else dict(architecture="topk_transcoder", d_out=17, apply_b_dec=False)))
        conv.convert(tmp_path / f"native-{name}", tmp_path / f"ours-{name}", to="sparsify")
        sae = SparseCoder.load_from_disk(tmp_path / f"ours-{name}")
        x = make_case().x
        enc = sae.encode(mx.array(x))
        out = sae.decode(enc.top_acts, enc.top_indices)
        feats, ref_out = saelens_forward(cfg, t, x.astype(np.float64))
        dense = np.zeros_like(feats)
        np.put_along_axis(dense, np.array(enc.top_indices).astype(np.int64), np.array(enc.top_acts), axis=1)
        assert_close(dense, feats, 1e-5)
        assert_close(np.array(out), ref_out, 1e-5)


# ---- dtypes ----

@pytest.mark.parametrize("to", ["saelens", "sparsify"])
@pytest.mark.parametrize("dtype, stored", [("bf16", "BF16"), ("fp16", "F16"), ("fp32", "F32")])
def test_dtype_conversion(tmp_path, to, dtype, stored):
    _, src = write_case(tmp_path, "skip-transcoder")
    (report,) = conv.convert(src, tmp_path / "out", to=to, dtype=dtype)
    weights = "sae_weights.safetensors" if to == "saelens" else "sae.safetensors"
    header, _ = read_header(tmp_path / "out" / weights)
    assert {info["dtype"] for info in header.values()} == {stored}
    assert report.tolerance == (1e-4 if dtype == "fp32" else 2e-2) and report.verified
    if to == "saelens":
        assert json.loads((tmp_path / "out" / "cfg.json").read_text())["dtype"] == {
            "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    # and back up to fp32 from the low-precision copy: still proven, within the low-precision tolerance
    (back,) = conv.convert(tmp_path / "out", tmp_path / "back", to="sparsify", dtype="fp32")
    assert back.verified and back.tolerance == (1e-4 if dtype == "fp32" else 2e-2)


def test_fp16_overflow_is_refused(tmp_path):
    c = case("sae")
    c.params["b_dec"][0] = 1e6
    src = c.write(tmp_path / "src")
    with pytest.raises(UserError, match="does not fit in float16"):
        conv.convert(src, tmp_path / "out", to="saelens", dtype="fp16")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


# ---- refusals: never dropped silently ----

@pytest.mark.parametrize("kw, message", [
    (dict(activation="groupmax"), "groupmax"),
    (dict(activation="groupmax", transcode=True), "groupmax"),
    (dict(skip_connection=True), "skip_connection"),
])
def test_refused_to_saelens(tmp_path, kw, message):
    src = make_case(**kw).write(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        conv.convert(src, tmp_path / "out", to="saelens")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    conv.convert(src, tmp_path / "same", to="sparsify")  # re-saving in our own format is fine


@pytest.mark.parametrize("changes, message", [
    (dict(architecture="jumprelu", extra_tensors={"threshold": np.zeros(120, np.float32)}), "JumpReLU"),
    (dict(architecture="standard"), "ReLU SAE"),
    (dict(architecture="gated"), "gated"),
    (dict(architecture="abstopk"), "AbsTopK"),
    (dict(architecture="transcoder", d_out=17, apply_b_dec=False), "ReLU transcoder"),
    (dict(architecture="jumprelu_transcoder", d_out=17, apply_b_dec=False), "JumpReLU transcoder"),
    (dict(architecture="mystery"), "'mystery'"),
    (dict(extra_cfg={"normalize_activations": "layer_norm"}), "layer_norm"),
    (dict(extra_cfg={"normalize_activations": "expected_average_only_in"}), "scaling factor"),
    (dict(extra_cfg={"normalize_activations": "constant_norm_rescale"}), "constant_norm_rescale"),
    (dict(extra_tensors={"threshold": np.zeros(120, np.float32)}), "unexpected tensor"),
    (dict(extra_tensors={"scaling_factor": np.full(120, 2.0, np.float32)}), "scaling_factor"),
])
def test_refused_from_saelens(tmp_path, changes, message):
    native_saelens(tmp_path / "native", **changes)
    with pytest.raises(UserError, match=message):
        conv.convert(tmp_path / "native", tmp_path / "out", to="sparsify")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_trivial_scaling_factor_is_accepted(tmp_path):
    native_saelens(tmp_path / "native", extra_tensors={"scaling_factor": np.ones(120, np.float32)})
    (report,) = conv.convert(tmp_path / "native", tmp_path / "out", to="sparsify")
    assert report.verified


# ---- the proof catches wrong conversions ----

def _bug_skip_b_dec(cfg, tensors):  # the widely used loader's bug: b_dec is not subtracted before encoding
    return dict(cfg, apply_b_dec_to_input=False), tensors


def _bug_no_transpose(cfg, tensors):  # W_enc written as [d_sae, d_in]
    return cfg, dict(tensors, W_enc=np.ascontiguousarray(tensors["W_enc"].T))


def _bug_transposed_w_dec(cfg, tensors):  # W_dec in the wrong orientation (d_in == d_out, so shapes still fit)
    w = tensors["W_dec"]
    return cfg, dict(tensors, W_dec=np.ascontiguousarray(w.reshape(w.shape[1], w.shape[0]).T))


def _bug_drop_skip(cfg, tensors):
    return dict(cfg, architecture="topk_transcoder"), {k: v for k, v in tensors.items() if k != "W_skip"}


@pytest.mark.parametrize("name, bug", [("sae", _bug_skip_b_dec), ("sae", _bug_no_transpose),
                                       ("sae", _bug_transposed_w_dec), ("skip-transcoder", _bug_drop_skip)])
def test_wrong_conversion_is_caught_and_nothing_written(tmp_path, monkeypatch, name, bug):
    _, src = write_case(tmp_path, name)
    original = saelens.ours_to_saelens
    monkeypatch.setattr(saelens, "ours_to_saelens", lambda *a, **k: bug(*original(*a, **k)))
    with pytest.raises(UserError) as info:
        conv.convert(src, tmp_path / "out", to="saelens")
    assert isinstance(info.value, (conv.VerificationError, CheckpointError))
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    # with --no-verify the (wrong) output would have been written: the proof is what stops it
    if isinstance(info.value, conv.VerificationError):
        conv.convert(src, tmp_path / "unchecked", to="saelens", verify=False)
        assert (tmp_path / "unchecked" / "sae_weights.safetensors").is_file()


# ---- corrupt or mismatched inputs ----

def _truncate(folder):
    path = folder / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _nan(folder):
    t, _ = load_safetensors_numpy(folder / "sae.safetensors")
    t["b_dec"] = t["b_dec"].copy()
    t["b_dec"][1] = np.nan
    save_safetensors_numpy(folder / "sae.safetensors", t)


def _wrong_shape(folder):
    data = json.loads((folder / "cfg.json").read_text())
    data["d_in"] = 24
    (folder / "cfg.json").write_text(json.dumps(data))


def _bad_json(folder):
    (folder / "cfg.json").write_text("{not json")


def _both_formats(folder):
    shutil.copy(folder / "sae.safetensors", folder / "sae_weights.safetensors")


def _no_weights(folder):
    (folder / "sae.safetensors").unlink()


def _not_safetensors(folder):
    (folder / "sae.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")


@pytest.mark.parametrize("damage, message", [
    (_truncate, "truncated"), (_nan, "NaN"), (_wrong_shape, "shape"), (_bad_json, "not a JSON"),
    (_both_formats, "both"), (_no_weights, "no weights|expected sae.safetensors"),
    (_not_safetensors, "not a safetensors"),
])
def test_corrupt_input_gives_clear_error_and_writes_nothing(tmp_path, damage, message):
    _, src = write_case(tmp_path, "sae")
    damage(src)
    with pytest.raises(UserError, match=message):
        conv.convert(src, tmp_path / "dst" / "out", to="saelens")
    assert not (tmp_path / "dst").exists()  # not even the parent folder it would have created


def test_saelens_input_mismatches(tmp_path):
    native_saelens(tmp_path / "a", extra_cfg={"d_sae": 121})
    with pytest.raises(CheckpointError, match="shape"):
        conv.convert(tmp_path / "a", tmp_path / "out", to="sparsify")
    cfg, t = native_saelens(tmp_path / "b", architecture="topk_transcoder", d_out=17, apply_b_dec=False)
    t["W_dec"] = np.ascontiguousarray(t["W_dec"].T)
    save_safetensors_numpy(tmp_path / "b" / "sae_weights.safetensors", t)
    with pytest.raises(CheckpointError, match="transposed"):
        conv.convert(tmp_path / "b", tmp_path / "out", to="sparsify")
    native_saelens(tmp_path / "c", extra_cfg={"k": 0})
    with pytest.raises(CheckpointError, match="k must be"):
        conv.convert(tmp_path / "c", tmp_path / "out", to="sparsify")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(UserError, match="not found"):
        conv.convert(tmp_path / "nope", tmp_path / "out", to="saelens")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        conv.convert(tmp_path / "empty", tmp_path / "out", to="saelens")
    with pytest.raises(UserError, match="target format"):
        conv.convert(tmp_path / "empty", tmp_path / "out", to="onnx")
    with pytest.raises(UserError, match="dtype"):
        conv.convert(tmp_path / "empty", tmp_path / "out", to="saelens", dtype="int8")


# ---- destinations and run folders ----

def test_destination_rules(tmp_path):
    _, src = write_case(tmp_path, "sae")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        conv.convert(src, tmp_path / "full", to="saelens")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="outside the source"):
        conv.convert(src, src / "inner", to="saelens")
    conv.convert(src, tmp_path / "new", to="saelens")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "new").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's private 0700
    (tmp_path / "empty").mkdir()
    conv.convert(src, tmp_path / "empty", to="saelens")
    assert (tmp_path / "empty" / "sae_weights.safetensors").is_file()
    conv.convert(src, tmp_path / "full", to="saelens", overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "cfg.json").is_file()
    assert no_leftovers(tmp_path)


def test_run_folder(tmp_path):
    run = tmp_path / "run"
    make_case().write(run / "layers.3")
    make_case(transcode=True, seed=1).write(run / "layers.5.mlp")
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    reports = conv.convert(run, tmp_path / "sl", to="saelens")
    assert [r.name for r in reports] == ["layers.3", "layers.5.mlp"] and all(r.verified for r in reports)
    meta = json.loads((tmp_path / "sl" / "layers.3" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M" and meta["hook_name"] == "blocks.3.hook_resid_post"
    assert meta["sparsify_hookpoint"] == "layers.3"
    back = conv.convert(tmp_path / "sl", tmp_path / "back", to="sparsify")
    assert [r.name for r in back] == ["layers.3", "layers.5.mlp"]

    (only,) = conv.convert(run, tmp_path / "one", to="saelens", hookpoint="layers.5.mlp")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "layers.5.mlp"]
    with pytest.raises(UserError, match="no hookpoint folder.*layers.9.*found layers.3, layers.5.mlp"):
        conv.convert(run, tmp_path / "none", to="saelens", hookpoint="layers.9")
    with pytest.raises(UserError, match="itself a checkpoint folder"):
        conv.convert(run / "layers.3", tmp_path / "none", to="saelens", hookpoint="layers.5.mlp")

    # one hookpoint that cannot convert: the whole run fails and nothing is written (no half-converted run)
    make_case(activation="groupmax").write(run / "layers.7")
    with pytest.raises(UserError, match="groupmax"):
        conv.convert(run, tmp_path / "partial", to="saelens")
    assert not (tmp_path / "partial").exists() and no_leftovers(tmp_path)


# ---- hook names, run metadata, dtype as stored ----

HOOK_NAMES = [  # (hookpoint, model family, transcode, hook_name, hook_name_out)
    ("layers.3", "HuggingFaceTB/SmolLM2-135M", False, "blocks.3.hook_resid_post", None),
    ("layers.3.mlp", "meta-llama/Llama-3.2-1B", False, "blocks.3.hook_mlp_out", None),
    ("layers.3.self_attn", "Qwen/Qwen2.5-0.5B", False, "blocks.3.hook_attn_out", None),
    ("embed_tokens", "HuggingFaceTB/SmolLM2-135M", False, "hook_embed", None),
    ("h.11", "gpt2", False, "blocks.11.hook_resid_post", None),
    ("h.2.attn", "gpt2", False, "blocks.2.hook_attn_out", None),
    ("layers.4.attention", "EleutherAI/pythia-70m", False, "blocks.4.hook_attn_out", None),
    ("layers.5.mlp", "HuggingFaceTB/SmolLM2-135M", True, "blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out"),
    ("layers.5", "meta-llama/Llama-3.2-1B", True, "blocks.5.hook_resid_pre", "blocks.5.hook_resid_post"),
    ("h.0.attn", "gpt2", True, "blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"),
]


@pytest.mark.parametrize("hookpoint, model, transcode, hook, hook_out", HOOK_NAMES)
def test_transformer_lens_hook_names_and_back(hookpoint, model, transcode, hook, hook_out):
    meta, notes = saelens.export_metadata(hookpoint, transcode, {"model": model})
    assert meta["hook_name"] == hook and meta.get("hook_name_out") == hook_out and meta["model_name"] == model
    assert meta["model_class_name"] == "HookedTransformer" and meta["hook_head_index"] is None
    assert ("hook_normalized" in hook) == any("before the" in note for note in notes)  # the norm-weight caveat
    # the reverse mapping, from TransformerLens's names alone (as a SAELens-trained coder has them)
    native = {k: v for k, v in meta.items() if k != "sparsify_hookpoint"}
    assert saelens.sparsify_hookpoint(native, transcode) == hookpoint


HF_HOOKS = [  # (hookpoint, model family, transcode, hook_name, hook_name_out): HookedProxyLM's module paths
    ("layers.3", "HuggingFaceTB/SmolLM2-135M", False, "model.layers.3", None),
    ("layers.3.mlp", "meta-llama/Llama-3.2-1B", True, "model.layers.3.post_attention_layernorm", "model.layers.3.mlp"),
    ("layers.3.mlp", "google/gemma-2-2b", True, "model.layers.3.pre_feedforward_layernorm", "model.layers.3.mlp"),
    ("layers.3.self_attn", "Qwen/Qwen2.5-0.5B", True, "model.layers.3.input_layernorm", "model.layers.3.self_attn"),
    ("layers.4", "HuggingFaceTB/SmolLM2-135M", True, "model.layers.3", "model.layers.4"),
    ("h.2.mlp", "gpt2", True, "transformer.h.2.ln_2", "transformer.h.2.mlp"),
    ("h.2", "gpt2", False, "transformer.h.2", None),
    ("layers.1.mlp", "EleutherAI/pythia-70m", True, "gpt_neox.layers.1.post_attention_layernorm",
     "gpt_neox.layers.1.mlp"),
]


@pytest.mark.parametrize("hookpoint, model, transcode, hook, hook_out", HF_HOOKS)
def test_hf_module_hook_names_and_back(hookpoint, model, transcode, hook, hook_out):
    """--hook-names hf: SAELens's AutoModelForCausalLM wrapper hooks each module's output by its path; a transcoder's
    input is its module's input, the output of the norm before it (exact, so no caveat)."""
    meta, notes = saelens.export_metadata(hookpoint, transcode, {"model": model}, hook_names="hf")
    assert meta["hook_name"] == hook and meta.get("hook_name_out") == hook_out
    assert meta["model_class_name"] == "AutoModelForCausalLM" and not any("before the" in n for n in notes)
    native = {k: v for k, v in meta.items() if k != "sparsify_hookpoint"}
    assert saelens.sparsify_hookpoint(native, transcode) == hookpoint


def test_reverse_mapping_edge_cases():
    assert saelens.sparsify_hookpoint({"hook_name": "blocks.4.hook_resid_pre"}, False) == "layers.3"
    assert saelens.sparsify_hookpoint({"hook_name": "blocks.0.hook_resid_pre"}, False) is None
    assert saelens.sparsify_hookpoint({"hook_name": "blocks.4.attn.hook_z", "hook_head_index": None}, False) is None
    assert saelens.sparsify_hookpoint({"hook_name": "blocks.4.hook_resid_post", "hook_head_index": 2}, False) is None
    # a transcoder's pair must be the module's own input and output
    assert saelens.sparsify_hookpoint({"hook_name": "blocks.4.ln2.hook_normalized",
                                       "hook_name_out": "blocks.5.hook_mlp_out"}, True) is None
    assert saelens.transformer_lens_hooks("layers.3.mlp.gate_proj", False) is None
    meta, notes = saelens.export_metadata("layers.3.mlp.gate_proj", False, {})
    assert meta["hook_name"] == "layers.3.mlp.gate_proj" and "model_class_name" not in meta
    assert any("no hook" in note for note in notes)


def test_run_metadata_from_our_state_json(tmp_path):
    """Our own run folder (state.json): the built-in model's hub name, the context size; no local dataset path."""
    run = tmp_path / "run"
    make_case(transcode=True).write(run / "layers.5.mlp")
    state = {"format": "sae-twins/train-state", "train_config": {"model": "builtin:smollm2", "dataset": "builtin:pydoc",
                                                                 "ctx_len": 256}}
    (run / "state.json").write_text(json.dumps(state))
    (report,) = conv.convert(run, tmp_path / "sl", to="saelens")
    meta = json.loads((tmp_path / "sl" / "layers.5.mlp" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["context_size"] == 256
    assert meta["hook_name"] == "blocks.5.ln2.hook_normalized" and meta["hook_name_out"] == "blocks.5.hook_mlp_out"
    assert "dataset_path" not in meta and meta["sparsify_hookpoint"] == "layers.5.mlp"
    assert any("ln2.hook_normalized is the normalised input" in note for note in report.notes)
    assert conv.main([str(run), str(tmp_path / "hf"), "--to", "saelens", "--hook-names", "hf"]) == 0
    meta = json.loads((tmp_path / "hf" / "layers.5.mlp" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "model.layers.5.post_attention_layernorm"
    assert meta["hook_name_out"] == "model.layers.5.mlp" and meta["model_class_name"] == "AutoModelForCausalLM"
    (run / "state.json").unlink()
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "ctx_len": 2048,
                                                 "dataset": "EleutherAI/fineweb-edu-dedup-10b"}))
    conv.convert(run, tmp_path / "sl2", to="saelens")
    meta = json.loads((tmp_path / "sl2" / "layers.5.mlp" / "cfg.json").read_text())["metadata"]
    assert meta["dataset_path"] == "EleutherAI/fineweb-edu-dedup-10b" and meta["context_size"] == 2048


def test_saelens_run_imports_under_sparsify_hookpoints(tmp_path):
    """A folder of SAELens coders named by SAELens's ids becomes a run folder named by sparsify's hookpoints, which
    load_many reads and whose coders compute what the SAELens ones compute."""
    src = tmp_path / "release"
    native_saelens(src / "l3-resid", extra_cfg={"metadata": {"sae_lens_version": "6.18.0", "model_name": "gpt2",
                                                             "hook_name": "blocks.3.hook_resid_post"}})
    native_saelens(src / "l7-mlp", seed=4, extra_cfg={"metadata": {"sae_lens_version": "6.18.0",
                                                                   "model_name": "gpt2",
                                                                   "hook_name": "blocks.7.hook_mlp_out"}})
    reports = conv.convert(src, tmp_path / "run", to="sparsify")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["h.3", "h.7.mlp"]
    assert [r.path.name for r in reports] == ["h.3", "h.7.mlp"] and all(r.verified for r in reports)
    assert any("hookpoint h.3 (from hook_name blocks.3.hook_resid_post)" in n for n in reports[0].notes)
    from sae_torch import SparseCoder

    assert list(SparseCoder.load_many(tmp_path / "run")) == ["h.3", "h.7.mlp"]
    # back to SAELens: SAELens's own metadata (hook names, model) returns unchanged
    conv.convert(tmp_path / "run", tmp_path / "again", to="saelens")
    meta = json.loads((tmp_path / "again" / "h.7.mlp" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.7.hook_mlp_out" and meta["model_name"] == "gpt2"

    # one coder without a sparsify name (a per-head hook): every folder keeps its own name
    native_saelens(src / "l2-z", seed=5, extra_cfg={"metadata": {"sae_lens_version": "6.18.0", "model_name": "gpt2",
                                                                 "hook_name": "blocks.2.attn.hook_z"}})
    conv.convert(src, tmp_path / "kept", to="sparsify")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["l2-z", "l3-resid", "l7-mlp"]


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float64"])
def test_dtype_is_kept_as_stored(tmp_path, stored):
    """Without --dtype the SAELens copy keeps the source's dtype, and its cfg.json says so (SAELens casts every
    tensor to cfg.json's dtype on load: a wrong one there would silently change the weights)."""
    c = case("skip-transcoder")
    dtype = np.dtype(ml_dtypes.bfloat16) if stored == "bfloat16" else np.dtype(stored)
    c.params = {name: value.astype(dtype) for name, value in c.params.items()}
    src = c.write(tmp_path / "src")
    (report,) = conv.convert(src, tmp_path / "out", to="saelens")
    header, _ = read_header(tmp_path / "out" / "sae_weights.safetensors")
    names = {"bfloat16": "BF16", "float16": "F16", "float64": "F64"}
    assert {info["dtype"] for info in header.values()} == {names[stored]} and "W_skip" in header
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["dtype"] == stored == report.dtype
    assert report.verified


# ---- CLI ----

def test_cli(tmp_path, capsys):
    _, src = write_case(tmp_path, "transcoder")
    assert conv.main([str(src), str(tmp_path / "out"), "--to", "saelens", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "sparsify -> saelens (bfloat16), verified" in out and "wrote" in out

    assert conv.main([str(src), str(tmp_path / "out2"), "--to", "saelens", "--no-verify"]) == 0
    assert "NOT verified" in capsys.readouterr().out

    assert conv.main([str(src), str(tmp_path / "out"), "--to", "sparsify"]) == 2  # exists, not empty
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and "Traceback" not in err

    groupmax = make_case(activation="groupmax").write(tmp_path / "gm")
    assert conv.main([str(groupmax), str(tmp_path / "x"), "--to", "saelens"]) == 2
    assert "groupmax" in capsys.readouterr().err and not (tmp_path / "x").exists()

    assert conv.main([str(src), str(tmp_path / "y")]) == 2  # --to is required
    assert "--to" in capsys.readouterr().err
    assert conv.main([str(src), str(tmp_path / "y"), "--to", "saelens", "--dtype", "int8"]) == 2
    capsys.readouterr()

    assert conv.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--to", "--dtype", "--hookpoint", "--no-verify", "--overwrite", "sparsify", "saelens"):
        assert flag in text


def test_cli_pair_for_the_main_parser(tmp_path, capsys):
    """sae_core.cli can mount the subcommand with add_arguments + run."""
    import argparse

    parser = argparse.ArgumentParser(prog="sae")
    sub = parser.add_subparsers(dest="command")
    conv.add_arguments(sub.add_parser("convert"))
    _, src = write_case(tmp_path, "sae")
    args = parser.parse_args(["convert", str(src), str(tmp_path / "out"), "--to", "saelens", "--hookpoint",
                              src.name])
    assert conv.run(args) == 0
    assert (tmp_path / "out" / "cfg.json").is_file()


# ---- against sae-lens itself ----

def _sae_lens_python() -> str | None:
    if os.environ.get("SAE_LENS_PYTHON"):
        return os.environ["SAE_LENS_PYTHON"]
    return sys.executable if importlib.util.find_spec("sae_lens") is not None else None


@pytest.mark.slow
def test_real_sae_lens(tmp_path):
    """Our SAELens output loads in sae-lens and computes what the oracle computes; a TopK SAE saved by sae-lens itself
    (rescale_acts_by_decoder_norm, non-unit decoder rows) converts to ours and computes what sae-lens computes."""
    python = _sae_lens_python()
    if python is None:
        pytest.skip("sae_lens is not importable here and SAE_LENS_PYTHON is not set (see the module docstring)")
    c0 = make_case()
    x = c0.x
    np.save(tmp_path / "x.npy", x)
    cases = {name: case(name) for name in ("sae", "transcoder", "skip-transcoder")}
    cases["sae-bf16"] = case("sae")
    load = []
    for name, c in cases.items():
        c.write(tmp_path / name)
        conv.convert(tmp_path / name, tmp_path / f"{name}-sl", to="saelens",
                     dtype="bf16" if name.endswith("bf16") else None)
        load.append({"folder": str(tmp_path / f"{name}-sl"), "out": str(tmp_path / f"{name}.npz")})
    make = [{"folder": str(tmp_path / "native"), "out": str(tmp_path / "native.npz"), "d_in": 23, "d_sae": 120,
             "k": 6, "seed": 0, "rescale": True, "apply_b_dec": True}]
    (tmp_path / "spec.json").write_text(json.dumps({"x": str(tmp_path / "x.npy"), "load": load, "make": make}))
    done = subprocess.run([python, str(PROBE), str(REPO), str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"sae_lens {info['sae_lens']}: {info['classes']}")

    for name, c in cases.items():
        got = np.load(tmp_path / f"{name}.npz")
        dense, sae_out = oracle_dense(c.cfg, c.params, x)
        rel = 2e-2 if name.endswith("bf16") else 1e-5
        assert_close(got["feats"], dense, rel)
        assert_close(got["out"], sae_out, rel)

    (report,) = conv.convert(tmp_path / "native", tmp_path / "native-ours", to="sparsify")
    assert any("rescale" in note for note in report.notes)
    cfg, _, _, params = load_checkpoint_numpy(tmp_path / "native-ours")
    got = np.load(tmp_path / "native.npz")
    dense, sae_out = oracle_dense(cfg, params, x)
    assert_close(dense, got["feats"], 1e-5)
    assert_close(sae_out, got["out"], 1e-5)


@pytest.mark.slow
def test_sae_lens_reads_the_same_activations(tmp_path, tiny_model_dir):
    """--hook-names hf, checked by SAELens itself: it loads the model our metadata names the way its tools do
    (load_model with model_class_name AutoModelForCausalLM), reads the activations at hook_name / hook_name_out with
    run_with_cache, and they are the tensors our trainer captures at the sparsify hookpoint (a transcoder's module
    input and output included); the coder applied there computes what ours computes."""
    python = _sae_lens_python()
    if python is None:
        pytest.skip("sae_lens is not importable here and SAE_LENS_PYTHON is not set (see the module docstring)")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from sae_torch import SparseCoder
    from sae_torch.activations import capture

    run = tmp_path / "run"
    d = 32  # the tiny model's hidden size
    coders = {"layers.1": make_case(d_in=d, num_latents=64, k=4), "layers.2.mlp": make_case(
        d_in=d, d_out=d, num_latents=64, k=4, transcode=True, skip_connection=True, seed=1)}
    for name, c in coders.items():
        c.write(run / name)
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model_dir)}))
    conv.convert(run, tmp_path / "sl", to="saelens", hook_names="hf")
    tokens = np.random.default_rng(0).integers(0, 1000, size=(2, 16))
    np.save(tmp_path / "tokens.npy", tokens)
    spec = {"tokens": str(tmp_path / "tokens.npy"), "folders": [str(tmp_path / "sl" / n) for n in coders],
            "out": str(tmp_path / "hooks.npz")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    probe = REPO / "tests" / "data" / "convert" / "saelens_hooks_probe.py"
    done = subprocess.run([python, str(probe), str(REPO), str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "hooks.npz")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with capture(model, list(coders), True, stop_early=False) as ours, torch.no_grad():
        model(input_ids=torch.from_numpy(tokens))
    for i, name in enumerate(coders):
        inp, out = (t.flatten(0, 1).float().numpy() for t in ours[name])
        x = inp if coders[name].cfg.transcode else out
        np.testing.assert_allclose(got[f"in{i}"], x, rtol=0, atol=1e-5 * np.abs(x).max(), err_msg=name)
        if coders[name].cfg.transcode:
            np.testing.assert_allclose(got[f"out{i}"], out, rtol=0, atol=1e-5 * np.abs(out).max(), err_msg=name)
        with torch.no_grad():
            expected = SparseCoder.load_from_disk(run / name)(torch.from_numpy(x)).sae_out.numpy()
        assert_close(got[f"sae{i}"], expected, 1e-5)
