"""The Metal top-k kernel (sae_mlx/kernels/topk.py) through the Linux Metal harness, against its pure-MLX reference
(mx.argpartition) and a NumPy oracle: ties (the kernel takes the lowest columns), k=1, k=M, odd widths, rows of
-inf (AuxK's fixed-size selection over dead latents), -0.0 next to +0.0, bf16 and fp16 inputs, partial
threadgroups. Also: the dispatcher's setting (SAE_MLX_TOPK) and a SparseCoder forward with the kernel selecting."""
from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from parity.metal_harness import harness as H  # noqa: E402
from sae_mlx.kernels import topk as T  # noqa: E402
from sae_mlx.kernels.sparse_rows import HAS_METAL  # noqa: E402

harness_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or H.compiler_missing() is not None,
    reason="the Metal harness runs on Linux with g++ or clang++ (on a Mac the real kernel is tested below)")
metal_only = pytest.mark.skipif(not HAS_METAL, reason="needs Apple-silicon Metal")


def oracle(values: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k largest of each row, ties to the lowest columns ([N, k], each row sorted)."""
    v = values.astype(np.float64)
    cols = np.arange(v.shape[1])
    return np.stack([np.sort(np.lexsort((cols, -row))[:k]) for row in v])


def _values(name: str) -> tuple[np.ndarray, int, object]:
    rng = np.random.default_rng(len(name))
    if name == "f32-odd":  # M = 77 (two full blocks of 32 and a partial one), N = 11: a partial threadgroup
        return rng.standard_normal((11, 77)).astype(np.float32), 9, mx.float32
    if name == "ties":  # few distinct values: the k-th largest is shared by many columns
        return rng.integers(0, 4, (9, 70)).astype(np.float32), 23, mx.float32
    if name == "k1":
        return rng.standard_normal((5, 41)).astype(np.float32), 1, mx.float32
    if name == "k-equals-m":
        return rng.standard_normal((3, 19)).astype(np.float32), 19, mx.float32
    if name == "narrow":  # M < 32: most lanes hold no column
        return rng.standard_normal((4, 5)).astype(np.float32), 3, mx.float32
    if name == "inf-rows":  # AuxK's fixed-size selection: live latents masked to -inf, fewer dead than k
        v = rng.standard_normal((6, 50)).astype(np.float32)
        v[0] = -np.inf  # no dead latent at all
        v[1, 5:] = -np.inf  # 5 dead latents, k = 12
        v[2, ::7] = -np.inf
        return v, 12, mx.float32
    if name == "relu-zeros":  # ReLU'd pre-activations: mostly zeros, -0.0 among them, fewer positives than k
        v = np.maximum(rng.standard_normal((7, 64)).astype(np.float32) - 1.5, 0)
        v[:, 1::3] = -0.0
        return v, 16, mx.float32
    if name == "negative":
        return -np.abs(rng.standard_normal((4, 33))).astype(np.float32) - 1.0, 6, mx.float32
    if name == "bf16-ties":
        return rng.standard_normal((5, 90)).astype(ml_dtypes.bfloat16).astype(np.float32).round(1), 31, mx.bfloat16
    if name == "f16":
        return rng.standard_normal((5, 45)).astype(np.float16).astype(np.float32), 8, mx.float16
    raise KeyError(name)


CASES = ["f32-odd", "ties", "k1", "k-equals-m", "narrow", "inf-rows", "relu-zeros", "negative", "bf16-ties", "f16"]


@pytest.fixture(scope="module")
def results():
    inputs = {name: _values(name) for name in CASES}
    launches = [T.plan_topk_indices(mx.array(v).astype(dt), k) for v, k, dt in inputs.values()]
    outputs = H.run_many(launches)
    return {name: (inputs[name], out[0]) for name, out in zip(CASES, outputs)}


@harness_only
@pytest.mark.parametrize("name", CASES)
def test_metal_topk_matches_oracle_and_reference(results, name):
    (values, k, dtype), got = results[name]
    assert got.shape == (values.shape[0], k) and got.dtype == np.int32
    # the kernel: exactly the oracle's columns (ties to the lowest columns), each once
    np.testing.assert_array_equal(np.sort(got, axis=1), oracle(values, k))
    # the reference (argpartition) may pick other columns among ties, but the same values
    ref = np.array(T.topk_indices_reference(mx.array(values).astype(dtype), k))
    picked = np.sort(np.take_along_axis(values, got, 1), axis=1)
    np.testing.assert_array_equal(picked, np.sort(np.take_along_axis(values, ref, 1), axis=1))


def test_cases_cover_what_they_claim():
    (values, k, _), _ = (_values("ties"), None)
    kth = np.sort(values, axis=1)[:, -k]
    assert all((row == t).sum() > 1 for row, t in zip(values, kth))  # the k-th value is tied in every row
    launch = T.plan_topk_indices(mx.array(_values("f32-odd")[0]), 9)
    assert launch.grid[1] % launch.threadgroup[1] != 0  # a partial threadgroup
    relu, k, _ = _values("relu-zeros")
    assert ((relu > 0).sum(axis=1) < k).all() and np.signbit(relu[relu == 0]).any()


def test_setting_selects_the_kernel(monkeypatch):
    from sae_mlx.kernels import sparse_rows

    monkeypatch.delenv(T.TOPK_ENV, raising=False)
    monkeypatch.setattr(sparse_rows, "use_metal", lambda: True)
    assert T.topk_method() == "argpartition" and not T.use_metal_topk()  # the default until a Mac measures
    monkeypatch.setenv(T.TOPK_ENV, "metal")
    assert T.use_metal_topk()
    monkeypatch.setattr(sparse_rows, "use_metal", lambda: False)
    assert not T.use_metal_topk()  # no Metal: the reference, whatever the setting
    monkeypatch.setenv(T.TOPK_ENV, "radix")
    with pytest.raises(ValueError, match="SAE_MLX_TOPK must be one of argpartition, metal"):
        T.topk_method()
    with pytest.raises(ValueError, match="k must be"):
        T.plan_topk_indices(mx.zeros((2, 3)), 4)


@harness_only
def test_sparse_coder_forward_selects_with_the_kernel(monkeypatch):
    """A whole forward + backward (TopK, Multi-TopK, eager AuxK) with every selection and sparse kernel run by the
    harness equals the reference forward."""
    import mlx.nn as nn

    from sae_core.config import SparseCoderConfig
    from sae_mlx import SparseCoder

    mx.random.seed(3)
    sae = SparseCoder(12, SparseCoderConfig(num_latents=40, k=4, multi_topk=True))
    x = mx.random.normal((10, 12))
    dead = mx.array(np.arange(40) % 5 == 0)

    def loss(model):
        out = model(x, dead_mask=dead)
        return out.fvu + out.auxk_loss + out.multi_topk_fvu / 8, out

    (ref_loss, ref_out), ref_grads = nn.value_and_grad(sae, loss)(sae)
    mx.eval(ref_loss, ref_out, ref_grads)
    monkeypatch.setenv("SAE_EAGER", "1")
    monkeypatch.setenv(T.TOPK_ENV, "metal")
    with H.kernels_through_harness() as ran:
        (got_loss, got_out), got_grads = nn.value_and_grad(sae, loss)(sae)
        mx.eval(got_loss, got_out, got_grads)
    assert ran.count("sae_topk_rows") == 3  # TopK, AuxK over the dead latents, Multi-TopK
    np.testing.assert_array_equal(np.sort(np.array(got_out.latent_indices), 1),
                                  np.sort(np.array(ref_out.latent_indices), 1))
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    for name in ("encoder", "W_dec"):
        a, b = got_grads[name], ref_grads[name]
        a, b = (a["weight"], b["weight"]) if isinstance(a, dict) else (a, b)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


@pytest.mark.metal
@metal_only
@pytest.mark.parametrize("name", CASES + ["large"])
def test_real_metal_topk_matches_oracle(name):
    """On Apple silicon: the kernel itself, on the GPU (also a width and k of a real SAE)."""
    if name == "large":
        values, k, dtype = np.random.default_rng(0).standard_normal((64, 24576)).astype(np.float32), 32, mx.float32
    else:
        values, k, dtype = _values(name)
    with mx.stream(mx.gpu):
        got = np.array(T.topk_indices_metal(mx.array(values).astype(dtype), k))
    np.testing.assert_array_equal(np.sort(got, axis=1), oracle(values, k))
