"""Activations for training, MLX side: an mlx-lm language model with wrapped modules, an activation cache, or
arrays from the caller, as `mx.array`s; the shared parts (memo, cache streaming, hookpoint patterns, harvest) are
sae_core.sources'. A transformers model (torch's model runner, `sae_torch.activations`) is reached by name through
sae_core.loop when torch is installed, its batches converted to mx.arrays; this module never imports torch's.

Which runs the language model (`model_runner`): `mlx-lm` (the model converted to MLX by the optional `mlx-lm`
package; fast on Apple silicon) or `torch` (transformers on CPU/CUDA, its activations converted to MLX: on Linux,
where MLX's CPU matmul is a slow single-threaded reference BLAS, this is much faster). `auto` picks mlx-lm when
Metal is available and mlx-lm is installed, else torch when installed, else mlx-lm. The environment variable
`SAE_MLX_MODEL_RUNNER` sets the default. MLX alone (with mlx-lm) trains without torch.

Hookpoints have the torch side's names: module names under the model's base model (`model.model` for mlx-lm
models, `model.base_model` in transformers) matched with fnmatch patterns: `layers.6` is the output of decoder
layer 6, `layers.6.mlp` its MLP. Both runners tokenise with the same HuggingFace tokenizer, so they read the same
token chunks (same data fingerprint).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from sae_core.data import exclude_mask
from sae_core.errors import UserError
from sae_core.models import builtin_model_path
from sae_core.sources import ArraySource, CacheSource, ModelSource, resolve_hookpoint_names
from sae_core.sources import harvest as harvest_cache
from sae_core.train_config import BUILTIN_MODEL

MODEL_RUNNERS = ("auto", "mlx-lm", "torch")


# ---------------------------------------------------------------------------------------------------------------
# Devices, dtypes, array conversion
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> mx.Device:
    """auto: MLX's default device (the GPU on Apple silicon); cpu; gpu (also accepted: metal, mps, cuda)."""
    if device == "auto":
        return mx.default_device()
    if device == "cpu":
        return mx.Device(mx.cpu)
    if device.split(":")[0] in ("gpu", "metal", "mps", "cuda"):
        if not _gpu_available():
            raise UserError(f"device {device!r} asked for, but MLX sees no GPU here (Metal or CUDA); use cpu")
        return mx.Device(mx.gpu)
    raise UserError(f"unknown device {device!r} for the MLX backend (auto, cpu, gpu)")


def _gpu_available() -> bool:
    if mx.metal.is_available():
        return True
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and getattr(cuda, "is_available", lambda: False)())


DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}


def resolve_dtype(dtype: str) -> mx.Dtype:
    """The language model's dtype: auto is bfloat16 on a GPU, float32 on the CPU (the torch side's rule)."""
    if dtype == "auto":
        return mx.bfloat16 if mx.default_device() == mx.gpu and _gpu_available() else mx.float32
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype]


def to_mx(array) -> mx.array:
    """An mx.array from an mx.array, a NumPy array (bf16 through ml_dtypes included) or a torch tensor."""
    if isinstance(array, mx.array):
        return array
    if type(array).__module__.startswith("torch"):
        import torch

        t = array.detach().cpu()
        if t.dtype == torch.bfloat16:
            return mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
        return mx.array(t.contiguous().numpy())
    a = np.asarray(array)
    if a.dtype.name == "bfloat16":
        return mx.array(np.ascontiguousarray(a).view(np.uint16)).view(mx.bfloat16)
    return mx.array(np.ascontiguousarray(a))


def to_numpy(array: mx.array) -> np.ndarray:
    """NumPy copy of an mx.array; bf16 comes back as ml_dtypes.bfloat16 (np.array() of a bf16 array raises)."""
    if array.dtype == mx.bfloat16:
        import ml_dtypes

        return np.array(array.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(array)


# ---------------------------------------------------------------------------------------------------------------
# mlx-lm models
# ---------------------------------------------------------------------------------------------------------------


def has_mlx_lm() -> bool:
    return importlib.util.find_spec("mlx_lm") is not None


def choose_model_runner(runner: str | None = None) -> str:
    runner = runner or os.environ.get("SAE_MLX_MODEL_RUNNER") or "auto"
    if runner not in MODEL_RUNNERS:
        raise UserError(f"model runner must be one of {', '.join(MODEL_RUNNERS)}, got {runner!r}")
    if runner == "auto":
        if mx.metal.is_available() and has_mlx_lm():
            return "mlx-lm"
        if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None:
            return "torch"
        return "mlx-lm"
    return runner


def model_path(name: str) -> Path | str:
    """The folder or hub name of `name`; `builtin:smollm2` is materialised by the torch side once."""
    if name == BUILTIN_MODEL:
        return builtin_model_path()
    if name.startswith("builtin:"):
        raise UserError(f"unknown built-in model {name!r}; the built-in model is {BUILTIN_MODEL}")
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.startswith((".", "/", "~")):
        raise UserError(f"model {name!r} not found: no such folder")
    return name


def load_model(name: str, dtype: mx.Dtype | None = None):
    """(mlx-lm model, HuggingFace tokenizer) for a local folder, a hub name or `builtin:smollm2`.

    The tokenizer is transformers' AutoTokenizer of the same folder (what the torch side uses), so both backends
    cut the same token chunks; mlx-lm's own tokenizer wrapper is not used."""
    if not has_mlx_lm():
        raise UserError("running a language model in MLX needs the mlx-lm package: pip install mlx-lm "
                        "(or let the torch model runner produce the activations: SAE_MLX_MODEL_RUNNER=torch)")
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from transformers.utils import logging as hf_logging

    path = model_path(name)
    if not isinstance(path, Path):
        try:
            from mlx_lm.utils import _download

            path = Path(_download(path))
        except Exception as e:  # noqa: BLE001  (hub errors of every kind mean "not found")
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model {name!r} not found or not loadable: {first[:300]} (a hub name needs network "
                            f"access; offline, use a local folder or {BUILTIN_MODEL})") from None
    try:
        model, _ = mlx_lm_load_model(Path(path))
    except (OSError, ValueError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {name!r} could not be loaded by mlx-lm: {first[:300]}") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = _load_tokenizer(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    if dtype is not None:
        model.set_dtype(dtype)
    model.eval()
    model.freeze()
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    """Tokenizers are read-only here; loading one takes seconds, so a process loads each once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def base_model(model: nn.Module) -> nn.Module:
    """The module whose names are the hookpoints: `model.model` for mlx-lm's causal LMs (as HF's base_model)."""
    inner = model.get("model") if isinstance(model, nn.Module) else None
    return inner if isinstance(inner, nn.Module) else model


def _module_names(base: nn.Module) -> list[str]:
    return [name for name, _ in base.named_modules() if name]


def _get(base: nn.Module, name: str):
    obj = base
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj


def _set(base: nn.Module, name: str, value) -> None:
    *parents, last = name.split(".")
    obj = _get(base, ".".join(parents)) if parents else base
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def layer_list_name(model: nn.Module) -> str:
    """Name of the list of transformer layers in the base model (`layers` for mlx-lm models)."""
    base = base_model(model)
    n_layers = getattr(getattr(model, "args", None), "num_hidden_layers", None)
    candidates = [key for key, value in base.items() if isinstance(value, list) and value
                  and all(isinstance(v, nn.Module) for v in value) and (n_layers is None or len(value) == n_layers)]
    if not candidates:
        raise UserError("could not find the model's list of layers; give --hookpoints instead of --layers")
    return candidates[0]


def resolve_hookpoints(model: nn.Module, patterns: list[str], layers: list[int] | None = None,
                       layer_stride: int = 1) -> list[str]:
    """Module names matching `patterns` (fnmatch) or `layers` (indices); default: train_config.default_layer."""
    base = base_model(model)
    return resolve_hookpoint_names(_module_names(base), patterns, layers, layer_stride,
                                   lambda: layer_list_name(model), lambda prefix: len(base[prefix]))


class _StopForward(Exception):
    pass


class _Hook(nn.Module):
    """Stands in for a module during a forward: calls it, hands (args, kwargs, output) to `record`. Attribute
    reads fall through to the wrapped module (mlx-lm's model loop reads e.g. `layer.use_sliding`)."""

    def __init__(self, inner: nn.Module, record):
        super().__init__()
        self.inner = inner
        self._record = record

    def __getattr__(self, key):
        inner = self.get("inner")
        if key == "inner" or inner is None:
            return super().__getattr__(key)
        return getattr(inner, key)

    def __call__(self, *args, **kwargs):
        out = self["inner"](*args, **kwargs)
        self._record(args, kwargs, out)
        return out


@contextlib.contextmanager
def capture(model: nn.Module, hookpoints: list[str], transcode: bool, stop_early: bool = True):
    """Within the block, each model forward fills the yielded dict with {hook: (input, output)} (input only for
    transcoders, else None); with stop_early the forward is cut short once every hookpoint is captured (the caller
    runs it through `run_forward`). The modules are wrapped for the block and put back after it."""
    base = base_model(model)
    captured: dict[str, tuple[mx.array | None, mx.array]] = {}
    originals: dict[str, nn.Module] = {}

    def make_record(name):
        def record(args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            inp = None
            if transcode:
                inp = args[0] if args else next(v for v in kwargs.values() if isinstance(v, mx.array))
            captured[name] = (inp, out)
            if stop_early and len(captured) == len(hookpoints):
                raise _StopForward
        return record

    try:
        for name in hookpoints:
            originals[name] = _get(base, name)
            _set(base, name, _Hook(originals[name], make_record(name)))
        yield captured
    finally:
        for name, module in originals.items():
            _set(base, name, module)


def run_forward(model: nn.Module, tokens: mx.array) -> None:
    try:
        model(tokens)  # lazy: only what the captured arrays depend on is ever computed
    except _StopForward:
        pass


def model_widths(model: nn.Module, hookpoints: list[str], transcode: bool) -> dict[str, tuple[int, int]]:
    """{hook: (d_in, d_out)} found with a forward on two tokens."""
    with capture(model, hookpoints, transcode) as got:
        run_forward(model, mx.zeros((1, 2), dtype=mx.int32))
    widths = {}
    for hook in hookpoints:
        inp, out = got[hook]
        if not isinstance(out, mx.array) or out.ndim != 3:
            raise UserError(f"hookpoint {hook!r} does not output a [batch, seq, d] array; choose another module")
        d_out = out.shape[-1]
        widths[hook] = (inp.shape[-1] if transcode else d_out, d_out)
    return widths


# ---------------------------------------------------------------------------------------------------------------
# Activation sources
# ---------------------------------------------------------------------------------------------------------------


class ModelActivationSource(ModelSource):
    """sae_core.sources.ModelSource of an mlx-lm model (wrapped modules); the torch side's arguments."""

    def model_widths(self):
        return model_widths(self.model, self.hookpoints, self.transcode)

    def concat(self, arrays):
        return mx.concatenate(arrays)

    def split_rows(self, x, counts):
        parts = mx.split(x, np.cumsum(counts)[:-1].tolist())
        mx.eval(parts)
        return parts

    def nbytes(self, x) -> int:
        return x.nbytes

    def activations(self, tokens: np.ndarray) -> dict[str, tuple[mx.array, mx.array]]:
        keep = mx.array(np.flatnonzero(exclude_mask(tokens, self.exclude_tokens).reshape(-1)).astype(np.int32))
        with capture(self.model, self.hookpoints, self.transcode) as got:
            run_forward(self.model, mx.array(tokens.astype(np.int32)))
        out = {}
        for hook in self.hookpoints:
            inp, y = got[hook]
            y = y.reshape(-1, y.shape[-1])[keep]
            x = inp.reshape(-1, inp.shape[-1])[keep] if self.transcode else y
            out[hook] = (x, y)
        mx.eval(out)
        return out


class CacheActivationSource(CacheSource):
    def __init__(self, folder: str | Path, batch_tokens: int, seed: int, hookpoints: list[str] | None = None):
        super().__init__(folder, batch_tokens, seed, convert_batch, hookpoints)


class ArrayActivationSource(ArraySource):
    def __init__(self, batches: Iterable[dict]):
        super().__init__(batches, to_mx)


def convert_batch(batch: dict) -> dict[str, tuple[mx.array, mx.array]]:
    """{hook: (x, y)} of arrays or tensors as mx.arrays (y stays x where it is x)."""
    out = {}
    for hook, (x, y) in batch.items():
        mx_x = to_mx(x)
        out[hook] = (mx_x, mx_x if y is x else to_mx(y))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model runners, and harvest: write an activation cache
# ---------------------------------------------------------------------------------------------------------------


def load_model_source(cfg, dtype: str | None = None):
    """The mlx-lm model runner (sae_core.sources.load_model_source): load cfg.model; returns (hookpoints,
    make_source(chunks, exclude_tokens, batch_size=cfg.batch_size), tokenizer, model dtype name). `dtype`: the
    model dtype by name, overriding cfg.dtype (a resumed run keeps the one it started with)."""
    mx_dtype = resolve_dtype(dtype or cfg.dtype)
    model, tokenizer = load_model(cfg.model, mx_dtype)
    hookpoints = resolve_hookpoints(model, cfg.hookpoints, cfg.layers, cfg.layer_stride)

    def make(chunks, exclude, batch_size=None):
        return ModelActivationSource(model, hookpoints, chunks, batch_size or cfg.batch_size, cfg.seed,
                                     cfg.sae.transcode, exclude)
    return hookpoints, make, tokenizer, DTYPE_NAMES[mx_dtype]


def harvest(out: str | Path, cfg, *, save_dtype: str = "float32", shard_tokens: int = 65536,
            overwrite: bool = False, progress: bool = True, model_runner: str | None = None) -> dict:
    """sae_core.sources.harvest with the model run by `model_runner` (see the module docstring)."""
    from .trainer import MlxBackend

    return harvest_cache(out, cfg, MlxBackend(resolve_device(cfg.device), model_runner=model_runner),
                         save_dtype=save_dtype, shard_tokens=shard_tokens, overwrite=overwrite, progress=progress)


__all__ = ["ArrayActivationSource", "CacheActivationSource", "ModelActivationSource",
           "capture", "choose_model_runner", "harvest", "load_model", "load_model_source", "model_widths",
           "resolve_device", "resolve_dtype", "resolve_hookpoints", "run_forward", "to_mx", "to_numpy"]
