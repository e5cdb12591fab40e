"""Checkpoints across frameworks: files written by sae_torch load bit-identically in sae_mlx and the reverse, the
bad-checkpoint errors of tests/test_checkpoint.py also through sae_mlx, and one file gives the same forward pass
in both frameworks."""
import json
import struct

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from parity.fixtures import make_case  # noqa: E402
from parity.oracle import evaluate  # noqa: E402
from parity.runners import run_mlx, run_torch  # noqa: E402
from sae_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint_numpy, read_header  # noqa: E402
from sae_core.config import SparseCoderConfig  # noqa: E402
from sae_core.errors import CheckpointError  # noqa: E402
from sae_mlx import SparseCoder as MlxCoder  # noqa: E402
from sae_torch import SparseCoder as TorchCoder  # noqa: E402

DTYPES = {"float32": (torch.float32, mx.float32, "F32"), "bfloat16": (torch.bfloat16, mx.bfloat16, "BF16"),
          "float16": (torch.float16, mx.float16, "F16")}
SPARSIFY_CFG_KEYS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                     "skip_connection", "transcode", "d_in"}


def mlx_bits(a) -> np.ndarray:
    """The raw bits of an MLX array (np.array() of bf16 raises, so view as unsigned ints first)."""
    return np.array(a.view({1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.itemsize]))


def torch_bits(t) -> np.ndarray:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(
        {2: np.uint16, 4: np.uint32}[t.element_size()])


def mlx_state(sae) -> dict:
    return dict(tree_flatten(sae.parameters()))


TRANSCODER = (SparseCoderConfig(num_latents=30, k=3, transcode=True, skip_connection=True), 10, 7)
AUTOENCODER = (SparseCoderConfig(num_latents=36, k=4, activation="groupmax"), 9, 9)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", [TRANSCODER, AUTOENCODER], ids=["transcoder-skip", "groupmax-sae"])
def test_torch_checkpoint_loads_bit_identically_in_mlx(tmp_path, dtype, kind):
    torch_dtype, mlx_dtype, name = DTYPES[dtype]
    cfg, d_in, d_out = kind
    torch.manual_seed(0)
    sae = TorchCoder(d_in, cfg, dtype=torch_dtype, d_out=d_out)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_to_disk(tmp_path / "t")
    back = MlxCoder.load_from_disk(tmp_path / "t")
    assert back.dtype == mlx_dtype and (back.d_in, back.d_out, back.cfg) == (d_in, d_out, cfg)
    state = mlx_state(back)
    assert set(state) == set(sae.state_dict())
    for key, value in sae.state_dict().items():
        assert state[key].dtype == mlx_dtype and state[key].shape == tuple(value.shape), key
        assert np.array_equal(mlx_bits(state[key]), torch_bits(value)), key


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", [TRANSCODER, AUTOENCODER], ids=["transcoder-skip", "groupmax-sae"])
def test_mlx_checkpoint_loads_bit_identically_in_torch(tmp_path, dtype, kind):
    torch_dtype, mlx_dtype, name = DTYPES[dtype]
    cfg, d_in, d_out = kind
    mx.random.seed(1)
    sae = MlxCoder(d_in, cfg, dtype=mlx_dtype, d_out=d_out)
    sae.update({"encoder": {"weight": mx.random.normal(sae.encoder.weight.shape).astype(mlx_dtype),
                            "bias": mx.random.normal(sae.encoder.bias.shape).astype(mlx_dtype)},
                "W_dec": mx.random.normal(sae.W_dec.shape).astype(mlx_dtype),
                "b_dec": mx.random.normal(sae.b_dec.shape).astype(mlx_dtype)})
    sae.save_to_disk(tmp_path / "m")
    header, _ = read_header(tmp_path / "m" / WEIGHTS_FILE)
    assert {n: info["dtype"] for n, info in header.items()} == {n: name for n in mlx_state(sae)}  # bf16 stays bf16
    back = TorchCoder.load_from_disk(tmp_path / "m")
    assert back.dtype == torch_dtype and (back.d_in, back.d_out) == (d_in, d_out)
    state = mlx_state(sae)
    assert set(state) == set(back.state_dict())
    for key, value in back.state_dict().items():
        assert np.array_equal(mlx_bits(state[key]), torch_bits(value)), key
    # MLX reads its own file back bit for bit, and so does the NumPy reader
    again = mlx_state(MlxCoder.load_from_disk(tmp_path / "m"))
    _, _, _, arrays = load_checkpoint_numpy(tmp_path / "m")
    for key, value in state.items():
        assert again[key].dtype == mlx_dtype and np.array_equal(mlx_bits(again[key]), mlx_bits(value)), key
        assert np.array_equal(arrays[key].view(np.uint8).reshape(-1), mlx_bits(value).view(np.uint8).reshape(-1))


def test_our_checkpoint_has_sparsify_layout(tmp_path):
    sae = MlxCoder(16, SparseCoderConfig(expansion_factor=4, k=8))
    sae.save_to_disk(tmp_path / "layers.0")
    cfg = json.loads((tmp_path / "layers.0" / CONFIG_FILE).read_text())
    assert set(cfg) == SPARSIFY_CFG_KEYS and cfg["d_in"] == 16
    saved = load_file(str(tmp_path / "layers.0" / WEIGHTS_FILE))
    assert {n: tuple(t.shape) for n, t in saved.items()} == {
        "encoder.weight": (64, 16), "encoder.bias": (64,), "W_dec": (64, 16), "b_dec": (16,)}
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in saved.values())
    assert sorted(p.name for p in (tmp_path / "layers.0").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp left


def test_load_with_dtype_casts(tmp_path):
    case = make_case(transcode=True, skip_connection=True)
    case.write(tmp_path / "c")
    sae = MlxCoder.load_from_disk(tmp_path / "c", dtype=mx.bfloat16)
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(sae.parameters()))
    exact = MlxCoder.load_from_disk(tmp_path / "c")
    for name, value in case.params.items():
        assert np.array_equal(np.array(mlx_state(exact)[name]), value)


@pytest.mark.parametrize("case", [make_case(dead="few", seed=21),
                                  make_case(activation="groupmax", transcode=True, skip_connection=True,
                                            multi_topk=True, dead="many", seed=22)],
                         ids=lambda c: c.name)
def test_same_file_same_forward_in_both_frameworks(tmp_path, case):
    folder = case.write(tmp_path / "c")
    torch_out, torch_sel, _ = run_torch(case, checkpoint=folder)
    mlx_out, mlx_sel, _ = run_mlx(case, checkpoint=folder)
    # the k slots come in no particular order: align them by latent index
    t_order, m_order = np.argsort(torch_out["latent_indices"], 1), np.argsort(mlx_out["latent_indices"], 1)
    assert np.array_equal(np.take_along_axis(torch_out["latent_indices"], t_order, 1),
                          np.take_along_axis(mlx_out["latent_indices"], m_order, 1))
    # AuxK: the same dead latents among those with a positive pre-activation (zeros tie: either may be chosen)
    pre = evaluate(case.params, case.x, case.y, activation=case.cfg.activation, k=case.cfg.k,
                   transcode=case.cfg.transcode, grads=False).pre_acts
    for t_row, m_row, p_row in zip(torch_sel.aux_indices, mlx_sel.aux_indices, pre):
        assert {i for i in t_row if p_row[i] > 1e-6} == {i for i in m_row if p_row[i] > 1e-6}

    def rel(a, b):
        return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(np.asarray(b, np.float64)).max()

    assert rel(np.take_along_axis(mlx_out["latent_acts"], m_order, 1),
               np.take_along_axis(torch_out["latent_acts"], t_order, 1)) <= 1e-5
    assert rel(mlx_out["sae_out"], torch_out["sae_out"]) <= 1e-5
    for name in ("fvu", "auxk_loss", "multi_topk_fvu"):
        assert abs(float(mlx_out[name]) - float(torch_out[name])) <= 1e-5 * abs(float(torch_out[name])), name
    for name, grad in torch_out["grads"].items():
        assert rel(mlx_out["grads"][name], grad) <= 1e-5, name


@pytest.mark.parametrize("transcode", [True, False], ids=["transcoder", "autoencoder"])
def test_numpy_writer_is_read_by_mlx(tmp_path, transcode):
    """The autoencoder's encoder.weight and W_dec have equal shapes (d_in == d_out), with distinct values: a
    writer or reader that swaps equal-shaped tensors shows."""
    case = make_case(transcode=transcode, skip_connection=True)
    assert transcode or case.params["encoder.weight"].shape == case.params["W_dec"].shape
    case.write(tmp_path / "c")
    sae = MlxCoder.load_from_disk(tmp_path / "c")
    for name, value in case.params.items():
        assert np.array_equal(np.array(mlx_state(sae)[name]), value), name


# ---- sparsify-style files and every bad checkpoint, through sae_mlx (the cases of tests/test_checkpoint.py) ----

def write_sparsify_style(folder, d_in=16, num_latents=0, expansion_factor=4, k=8, tensors=None, **cfg_changes):
    """A checkpoint exactly as sparsify writes one: its cfg.json keys, its tensor names, safetensors via torch."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "expansion_factor": expansion_factor, "normalize_decoder": True,
           "num_latents": num_latents, "k": k, "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": d_in, **cfg_changes}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    m = num_latents or d_in * expansion_factor
    g = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {"encoder.weight": torch.randn(m, d_in, generator=g), "encoder.bias": torch.randn(m, generator=g),
                   "W_dec": torch.randn(m, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return tensors


def test_sparsify_checkpoint_loads(tmp_path):
    tensors = write_sparsify_style(tmp_path / "layers.3")
    sae = MlxCoder.load_from_disk(tmp_path / "layers.3")
    assert sae.num_latents == 64 and sae.cfg.k == 8
    for name, value in tensors.items():
        assert np.array_equal(np.array(mlx_state(sae)[name]), value.numpy())


def test_load_many_and_patterns(tmp_path):
    for name in ("layers.0", "layers.1", "layers.10.mlp"):
        write_sparsify_style(tmp_path / name)
    assert list(MlxCoder.load_many(tmp_path)) == ["layers.0", "layers.1", "layers.10.mlp"]
    assert list(MlxCoder.load_many(tmp_path, pattern="layers.?")) == ["layers.0", "layers.1"]
    assert list(MlxCoder.load_many(tmp_path, layers=["layers.1"])) == ["layers.1"]
    with pytest.raises(CheckpointError, match="no hookpoint folder"):
        MlxCoder.load_many(tmp_path, layers=["layers.7"])
    with pytest.raises(CheckpointError, match="run folder not found"):
        MlxCoder.load_many(tmp_path / "nowhere")
    encoder_only = MlxCoder.load_from_disk(tmp_path / "layers.0", decoder=False)
    assert encoder_only.W_dec is None
    assert sorted(n for n, _ in tree_flatten(encoder_only.parameters())) == ["b_dec", "encoder.bias",
                                                                              "encoder.weight"]
    full = MlxCoder.load_from_disk(tmp_path / "layers.0")
    x = mx.random.normal((5, 16))
    a, b = encoder_only.encode(x), full.encode(x)  # the encoder needs b_dec (x' = x - b_dec): it is loaded
    assert np.array_equal(np.array(a.top_acts), np.array(b.top_acts))


def _bad(tmp_path, **kwargs):
    folder = tmp_path / "bad"
    write_sparsify_style(folder, **kwargs)
    return folder


def _tensors(m=64, d=16, **overrides):
    t = {"encoder.weight": torch.zeros(m, d), "encoder.bias": torch.zeros(m), "W_dec": torch.zeros(m, d),
         "b_dec": torch.zeros(d)}
    t.update(overrides)
    return {n: v for n, v in t.items() if v is not None}


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensors=_tensors(W_dec=None)), r"sae.safetensors: missing tensor\(s\) W_dec"),
    (dict(tensors=_tensors(W_skip=torch.zeros(16, 16))), r"unexpected tensor\(s\) W_skip.*skip_connection is false"),
    (dict(tensors=_tensors(W_dec=torch.zeros(64, 15))), r"'W_dec' has shape \(64, 15\).*implies \(64, 16\)"),
    (dict(activation="relu"), r"cfg.json: unknown activation 'relu'"),
    (dict(k=100), r"cfg.json: k=100 is larger than the number of latents M=64"),
    (dict(activation="groupmax", k=7), r"groupmax needs num_latents divisible by k"),
    (dict(tensors=_tensors(**{"encoder.bias": torch.full((64,), float("nan"))})), r"'encoder.bias' contains NaN"),
    (dict(tensors=_tensors(W_dec=torch.full((64, 16), float("inf")))), r"'W_dec' contains NaN or Inf"),
    (dict(tensors=_tensors(b_dec=torch.zeros(16, dtype=torch.int32))), r"'b_dec' has dtype I32"),
    (dict(tensors=_tensors(**{"encoder.weight": torch.full((64, 16), float("nan"), dtype=torch.bfloat16)})),
     r"'encoder.weight' contains NaN"),
])
def test_bad_checkpoint_errors(tmp_path, kwargs, message):
    folder = _bad(tmp_path, **kwargs)
    with pytest.raises(CheckpointError, match=message) as info:
        MlxCoder.load_from_disk(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        TorchCoder.load_from_disk(folder)  # the same error whichever framework opens it


def test_truncated_and_foreign_files(tmp_path):
    folder = _bad(tmp_path)
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated file"):
        MlxCoder.load_from_disk(folder)
    weights.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        MlxCoder.load_from_disk(folder)
    weights.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        MlxCoder.load_from_disk(folder)
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="cfg.json: not a JSON object"):
        MlxCoder.load_from_disk(folder)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="cfg.json: missing"):
        MlxCoder.load_from_disk(folder)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        MlxCoder.load_from_disk(tmp_path / "nowhere")


def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    sae = MlxCoder(16, SparseCoderConfig(expansion_factor=4, k=8))
    sae.save_to_disk(tmp_path / "c")
    before = (tmp_path / "c" / WEIGHTS_FILE).read_bytes()

    def dies_halfway(file, arrays, metadata=None):
        with open(file, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", dies_halfway)
    sae.encoder.weight = sae.encoder.weight + 1
    with pytest.raises(KeyboardInterrupt):
        sae.save_to_disk(tmp_path / "c")
    assert (tmp_path / "c" / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp left
    MlxCoder.load_from_disk(tmp_path / "c")
