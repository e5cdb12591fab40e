"""Checkpoint layout (sparsify's), validation errors, atomic writes and bit-exact round trips."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from parity.fixtures import make_case
from sae_core.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, load_checkpoint_numpy, save_checkpoint_numpy,
                                 validate_checkpoint)
from sae_core.config import SparseCoderConfig
from sae_core.errors import CheckpointError
from sae_torch import SparseCoder

SPARSIFY_CFG_KEYS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                     "skip_connection", "transcode", "d_in"}


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
    sae = SparseCoder.load_from_disk(tmp_path / "layers.3")
    assert sae.num_latents == 64 and sae.cfg.k == 8
    for name, value in tensors.items():
        assert torch.equal(sae.state_dict()[name], value)


def test_our_checkpoint_has_sparsify_layout(tmp_path):
    sae = SparseCoder(16, SparseCoderConfig(expansion_factor=4, k=8))
    sae.save_to_disk(tmp_path / "layers.0")
    cfg = json.loads((tmp_path / "layers.0" / CONFIG_FILE).read_text())
    assert set(cfg) == SPARSIFY_CFG_KEYS and cfg["d_in"] == 16
    saved = load_file(str(tmp_path / "layers.0" / WEIGHTS_FILE))
    assert {n: tuple(t.shape) for n, t in saved.items()} == {
        "encoder.weight": (64, 16), "encoder.bias": (64,), "W_dec": (64, 16), "b_dec": (16,)}
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in saved.values())


# (cfg, d_in, d_out): a transcoder, and an autoencoder whose encoder.weight and W_dec (and, with the skip
# connection, W_skip rows) have equal shapes, so a writer or reader that swaps equal-shaped tensors shows
ROUND_TRIP_KINDS = {"transcoder-skip": (SparseCoderConfig(num_latents=30, k=3, transcode=True, skip_connection=True),
                                       10, 7),
                    "autoencoder-skip": (SparseCoderConfig(num_latents=9, k=3, skip_connection=True), 9, 9)}


@pytest.mark.parametrize("kind", list(ROUND_TRIP_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype, kind):
    cfg, d_in, d_out = ROUND_TRIP_KINDS[kind]
    sae = SparseCoder(d_in, cfg, dtype=dtype, d_out=d_out)
    with torch.no_grad():
        for i, p in enumerate(sae.parameters()):
            p.normal_().add_(10 * i)  # distinct values per tensor, even for equal shapes
    sae.save_to_disk(tmp_path / "t")
    back = SparseCoder.load_from_disk(tmp_path / "t")
    assert back.dtype == dtype and back.d_out == d_out
    saved, loaded = sae.state_dict(), back.state_dict()
    assert set(saved) == set(loaded)
    for name, a in saved.items():
        assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           loaded[name].view(torch.int16 if dtype != torch.float32 else torch.int32)), name
    # and the NumPy reader sees the same bits
    _, _, _, arrays = load_checkpoint_numpy(tmp_path / "t")
    assert np.array_equal(arrays["W_dec"].view(np.uint8), sae.W_dec.detach().view(torch.uint8).numpy())


@pytest.mark.parametrize("transcode", [True, False], ids=["transcoder", "autoencoder"])
def test_numpy_writer_is_read_by_torch(tmp_path, transcode):
    """The autoencoder's encoder.weight and W_dec have equal shapes (d_in == d_out), with distinct values: a
    writer or reader that swaps equal-shaped tensors shows."""
    case = make_case(transcode=transcode, skip_connection=True)
    assert transcode or case.params["encoder.weight"].shape == case.params["W_dec"].shape
    case.write(tmp_path / "c")
    sae = SparseCoder.load_from_disk(tmp_path / "c")
    for name, value in case.params.items():
        assert np.array_equal(sae.state_dict()[name].numpy(), value), name


def test_load_many_and_patterns(tmp_path):
    for name in ("layers.0", "layers.1", "layers.10.mlp"):
        write_sparsify_style(tmp_path / name)
    assert list(SparseCoder.load_many(tmp_path)) == ["layers.0", "layers.1", "layers.10.mlp"]
    assert list(SparseCoder.load_many(tmp_path, pattern="layers.?")) == ["layers.0", "layers.1"]
    assert list(SparseCoder.load_many(tmp_path, layers=["layers.1"])) == ["layers.1"]
    with pytest.raises(CheckpointError, match="no hookpoint folder"):
        SparseCoder.load_many(tmp_path, layers=["layers.7"])
    encoder_only = SparseCoder.load_from_disk(tmp_path / "layers.0", decoder=False)
    assert encoder_only.W_dec is None


# ---- every bad checkpoint gives a clear error naming the file and the problem ----

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
])
def test_bad_checkpoint_errors(tmp_path, kwargs, message):
    folder = _bad(tmp_path, **kwargs)
    with pytest.raises(CheckpointError, match=message) as info:
        SparseCoder.load_from_disk(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_numpy(folder)


def test_truncated_and_foreign_files(tmp_path):
    folder = _bad(tmp_path)
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated file"):
        SparseCoder.load_from_disk(folder)
    weights.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SparseCoder.load_from_disk(folder)
    weights.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        SparseCoder.load_from_disk(folder)
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="cfg.json: not a JSON object"):
        validate_checkpoint(folder)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="cfg.json: missing"):
        validate_checkpoint(folder)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        validate_checkpoint(tmp_path / "nowhere")


def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    sae = SparseCoder(16, SparseCoderConfig(expansion_factor=4, k=8))
    sae.save_to_disk(tmp_path / "c")
    before = (tmp_path / "c" / WEIGHTS_FILE).read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr("sae_torch.sparse_coder.save_file", dies_halfway)
    with torch.no_grad():
        sae.encoder.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        sae.save_to_disk(tmp_path / "c")
    assert (tmp_path / "c" / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp left
    SparseCoder.load_from_disk(tmp_path / "c")


def test_numpy_save_validates_shapes(tmp_path):
    cfg = SparseCoderConfig(num_latents=8, k=2)
    with pytest.raises(CheckpointError, match="do not match the config"):
        save_checkpoint_numpy(tmp_path / "x", cfg, 4, 4, {"encoder.weight": np.zeros((8, 4), np.float32)})
    assert not (tmp_path / "x" / WEIGHTS_FILE).exists()


def test_saved_files_get_normal_permissions(tmp_path):
    import os

    SparseCoder(8, SparseCoderConfig(num_latents=16, k=2)).save_to_disk(tmp_path / "c")
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "c" / name).stat().st_mode & 0o777 == 0o666 & ~umask
