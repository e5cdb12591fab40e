"""Activations for training, torch side: a HuggingFace causal LM with forward hooks (also the torch model runner of
the MLX backend), an activation cache, or arrays handed over by the caller, as tensors; the shared parts (memo,
cache streaming, hookpoint patterns, harvest) are sae_core.sources'.

Hookpoints are module names in `model.base_model.named_modules()` chosen with fnmatch patterns (sparsify's
convention: `layers.6`, `layers.*`, `layers.[0-5].mlp`). All hookpoints come from one model forward, which stops
right after the last of them has been captured.

The built-in model `builtin:smollm2`: sae_core.models.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from sae_core.data import exclude_mask
from sae_core.errors import UserError
from sae_core.models import builtin_model_path
from sae_core.sources import ArraySource, CacheSource, ModelSource, resolve_hookpoint_names
from sae_core.sources import harvest as harvest_cache
from sae_core.train_config import BUILTIN_MODEL

# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps; the MLX backend's gpu/metal mean mps where
    torch has it (the torch model runner of an MLX run), else auto."""
    if device.split(":")[0] in ("gpu", "metal"):
        device = "mps" if torch.backends.mps.is_available() else "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (auto, cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The language model's dtype: auto is bfloat16 on a GPU (CUDA, MPS), float32 on the CPU (MLX's rule too)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    """Tokenizers are read-only here; loading one takes seconds, so a process loads each once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a hub name, a local folder, or `builtin:smollm2`; UserError when not found."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if name == BUILTIN_MODEL:
        path = str(builtin_model_path())
    elif name.startswith("builtin:"):
        raise UserError(f"unknown built-in model {name!r}; the built-in model is {BUILTIN_MODEL}")
    else:
        path = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    if name.startswith((".", "/", "~")) and not Path(path).exists():
        raise UserError(f"model {name!r} not found: no such folder")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = _load_tokenizer(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {name!r} not found or not loadable: {first[:300]} "
                        f"(a hub name needs network access; offline, use a local folder or {BUILTIN_MODEL})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Hookpoints
# ---------------------------------------------------------------------------------------------------------------


def layer_list_name(model: nn.Module) -> str:
    """Name of the ModuleList of transformer layers in model.base_model (sparsify's get_layer_list)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [name for name, mod in model.base_model.named_modules()
                  if isinstance(mod, nn.ModuleList) and (n_layers is None or len(mod) == n_layers)]
    if not candidates:
        raise UserError("could not find the model's list of layers; give --hookpoints instead of --layers")
    return candidates[0]


def resolve_hookpoints(model: nn.Module, patterns: list[str], layers: list[int] | None = None,
                       layer_stride: int = 1) -> list[str]:
    """Module names matching `patterns` (fnmatch) or `layers` (indices); default: train_config.default_layer."""
    names = [name for name, _ in model.base_model.named_modules() if name]
    return resolve_hookpoint_names(names, patterns, layers, layer_stride, lambda: layer_list_name(model),
                                   lambda prefix: len(model.base_model.get_submodule(prefix)))


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture(model: nn.Module, hookpoints: list[str], transcode: bool, stop_early: bool = True):
    """Within the block, each model forward fills the yielded dict with {hook: (input, output)} (input only for
    transcoders, else None); with stop_early the forward is cut short once every hookpoint is captured (the caller
    runs it through `run_forward`)."""
    captured: dict[str, tuple[Tensor | None, Tensor]] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            inp = None
            if transcode:
                inp = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            captured[name] = (inp, out)
            if stop_early and len(captured) == len(hookpoints):
                raise _StopForward
        return hook

    try:
        for name in hookpoints:
            handles.append(model.base_model.get_submodule(name).register_forward_hook(make_hook(name),
                                                                                      with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_forward(model: nn.Module, tokens: Tensor) -> None:
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    except _StopForward:
        pass


def model_widths(model: nn.Module, hookpoints: list[str], transcode: bool) -> dict[str, tuple[int, int]]:
    """{hook: (d_in, d_out)} found with a forward on two tokens."""
    device = next(model.parameters()).device
    with capture(model, hookpoints, transcode) as got:
        run_forward(model, torch.zeros(1, 2, dtype=torch.long, device=device))
    widths = {}
    for hook in hookpoints:
        inp, out = got[hook]
        if not isinstance(out, Tensor) or out.dim() != 3:
            raise UserError(f"hookpoint {hook!r} does not output a [batch, seq, d] tensor; choose another module")
        d_out = out.shape[-1]
        widths[hook] = (inp.shape[-1] if transcode else d_out, d_out)
    return widths


# ---------------------------------------------------------------------------------------------------------------
# Activation sources
# ---------------------------------------------------------------------------------------------------------------


class ModelActivationSource(ModelSource):
    """sae_core.sources.ModelSource of a transformers model (forward hooks)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_widths(self):
        return model_widths(self.model, self.hookpoints, self.transcode)

    def concat(self, arrays):
        return torch.cat(arrays)

    def split_rows(self, x, counts):
        return [part.clone() for part in x.split(counts)]

    def nbytes(self, x) -> int:
        return x.numel() * x.element_size()

    def activations(self, tokens: np.ndarray) -> dict[str, tuple[Tensor, Tensor]]:
        mask = torch.from_numpy(exclude_mask(tokens, self.exclude_tokens).reshape(-1)).to(self.device)
        with capture(self.model, self.hookpoints, self.transcode) as got:
            run_forward(self.model, torch.from_numpy(tokens.astype(np.int64)).to(self.device))
        out = {}
        for hook in self.hookpoints:
            inp, y = got[hook]
            y = y.flatten(0, 1)[mask]
            x = inp.flatten(0, 1)[mask] if self.transcode else y
            out[hook] = (x, y)
        return out


def to_torch(array) -> Tensor:
    """A tensor from a tensor or a NumPy array (bf16 through ml_dtypes included)."""
    if isinstance(array, Tensor):
        return array
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class CacheActivationSource(CacheSource):
    def __init__(self, folder: str | Path, batch_tokens: int, seed: int, device: torch.device,
                 hookpoints: list[str] | None = None):
        super().__init__(folder, batch_tokens, seed, lambda batch: convert_batch(batch, device), hookpoints)


class ArrayActivationSource(ArraySource):
    def __init__(self, batches: Iterable[dict], device: torch.device | str = "cpu"):
        device = torch.device(device)
        super().__init__(batches, lambda a: to_torch(a).to(device))


def convert_batch(batch: dict, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """{hook: (x, y)} of arrays or tensors as tensors on `device` (y stays x where it is x)."""
    out = {}
    for hook, (x, y) in batch.items():
        tx = to_torch(x).to(device)
        out[hook] = (tx, tx if y is x else to_torch(y).to(device))
    return out


def load_model_source(cfg, dtype: str | None = None):
    """The torch model runner (sae_core.sources.load_model_source): load cfg.model; returns (hookpoints,
    make_source(chunks, exclude_tokens, batch_size=cfg.batch_size), tokenizer, model dtype name). `dtype`: the
    model dtype by name, overriding cfg.dtype (a resumed run keeps the one it started with)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(dtype or cfg.dtype, device)
    model, tokenizer = load_model(cfg.model, device, dtype)
    hookpoints = resolve_hookpoints(model, cfg.hookpoints, cfg.layers, cfg.layer_stride)

    def make(chunks, exclude, batch_size=None):
        return ModelActivationSource(model, hookpoints, chunks, batch_size or cfg.batch_size, cfg.seed,
                                     cfg.sae.transcode, exclude)
    return hookpoints, make, tokenizer, str(dtype).removeprefix("torch.")


def harvest(out: str | Path, cfg, *, save_dtype: str = "float32", shard_tokens: int = 65536,
            overwrite: bool = False, progress: bool = True) -> dict:
    """sae_core.sources.harvest with the torch model runner: an activation cache of cfg.model on cfg.dataset."""
    from .trainer import TorchBackend

    return harvest_cache(out, cfg, TorchBackend(resolve_device(cfg.device)), save_dtype=save_dtype,
                         shard_tokens=shard_tokens, overwrite=overwrite, progress=progress)
