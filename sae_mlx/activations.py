"""Activations for training, MLX side: an mlx-lm language model with wrapped modules, a torch HuggingFace model
(torch's model runner, `sae_torch.activations`, reached by name through sae_core.loop when torch is installed; its
batches converted to mx.arrays), an activation cache, or arrays from the caller. Every
source yields batches `{hookpoint: (x, y)}` of [N, d] `mx.array`s (N tokens, excluded tokens already dropped; y is
x for an autoencoder, the module's output for a transcoder whose x is the module's input) and can start at any
batch number, which is how a run resumes. The mirror of `sae_torch/activations.py`; the sources have the same
attributes (`hookpoints`, `widths`, `transcode`, `tokens_per_batch`, `batches_per_epoch`, `data_info`) and the
same `data_info`, so a checkpoint written by one backend resumes on the other.

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
import difflib
import fnmatch
import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from sae_core.activation_cache import ActivationCache
from sae_core.data import BatchOrder, exclude_mask, fingerprint
from sae_core.errors import UserError
from sae_core.models import builtin_model_path
from sae_core.train_config import BUILTIN_MODEL, default_layer

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


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    """Module names matching `patterns` (fnmatch) or `layers` (indices); default: the middle layer."""
    base = base_model(model)
    names = _module_names(base)
    if layers:
        prefix = layer_list_name(model)
        count = len(base[prefix])
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise UserError(f"layer(s) {bad} out of range: the model has {count} layers (0..{count - 1})")
        patterns = [f"{prefix}.{i}" for i in layers]
    elif not patterns:
        prefix = layer_list_name(model)
        patterns = [f"{prefix}.{default_layer(len(base[prefix]))}"]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else \
                f"; module names look like {', '.join(sorted(names, key=_natural_key)[:3])}, ..."
            raise UserError(f"unknown hookpoint {pattern!r}: no module of the model matches it{hint}")
        found += [h for h in hits if h not in found]
    return sorted(found, key=_natural_key)[::layer_stride]


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


class ModelActivationSource:
    """Activations of an mlx-lm language model on token chunks, batch_size sequences per batch, in data.py's
    order (the torch side's ModelActivationSource, same arguments).

    Chunks seen again in a later epoch are not run through the model twice: each chunk's activations are kept
    (up to memo_bytes in all, default 1 GiB) and reused. Outputs per sequence do not depend on the other
    sequences of a batch (checked bit for bit on the Linux CPU device by the tests), so a resumed run, which
    starts with an empty memo, trains on identical data.
    """

    kind = "model"

    def __init__(self, model: nn.Module, hookpoints: list[str], chunks: np.ndarray, batch_size: int, seed: int,
                 transcode: bool, exclude_tokens: list[int], memo_bytes: int = 2**30):
        self.model, self.hookpoints, self.chunks = model, hookpoints, chunks
        self.batch_size, self.seed, self.transcode = batch_size, seed, transcode
        self.exclude_tokens = list(exclude_tokens)
        self.widths = model_widths(model, hookpoints, transcode)
        self.tokens_per_batch = batch_size * chunks.shape[1]
        self.batches_per_epoch = len(chunks) // batch_size
        self.data_info = {"kind": self.kind, "fingerprint": fingerprint(chunks), "num_chunks": int(len(chunks)),
                          "tokens_per_batch": self.tokens_per_batch}
        self.memo: dict[int, dict[str, tuple[mx.array, mx.array]]] = {}
        self.memo_left = memo_bytes

    def batches(self, start: int = 0) -> Iterator[dict[str, tuple[mx.array, mx.array]]]:
        order = BatchOrder(len(self.chunks), self.batch_size, self.seed)
        position = start
        while True:
            index = [int(i) for i in order.indices(position)]
            if all(i in self.memo for i in index):
                yield {h: self._concat([self.memo[i][h] for i in index]) for h in self.hookpoints}
            else:
                tokens = self.chunks[index]
                acts = self.activations(tokens)
                self._remember(index, tokens, acts)
                yield acts
            position += 1

    @staticmethod
    def _concat(parts: list[tuple[mx.array, mx.array]]) -> tuple[mx.array, mx.array]:
        x = mx.concatenate([p[0] for p in parts])
        return x, (x if parts[0][1] is parts[0][0] else mx.concatenate([p[1] for p in parts]))

    def _remember(self, index: list[int], tokens: np.ndarray, acts: dict[str, tuple[mx.array, mx.array]]) -> None:
        counts = exclude_mask(tokens, self.exclude_tokens).sum(1)
        size = sum(x.nbytes + (0 if y is x else y.nbytes) for x, y in acts.values())
        if size > self.memo_left:
            return
        self.memo_left -= size
        cuts = np.cumsum(counts)[:-1].tolist()
        split = {h: (mx.split(x, cuts), None if y is x else mx.split(y, cuts)) for h, (x, y) in acts.items()}
        for n, i in enumerate(index):
            entry = {}
            for h, (xs, ys) in split.items():
                entry[h] = (xs[n], xs[n] if ys is None else ys[n])
            mx.eval(entry)
            self.memo.setdefault(i, entry)

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


class CacheActivationSource:
    """Batches of batch_tokens rows streamed from an activation cache (sae_core.activation_cache)."""

    kind = "cache"

    def __init__(self, folder: str | Path, batch_tokens: int, seed: int, hookpoints: list[str] | None = None):
        self.cache = ActivationCache(folder)
        self.hookpoints = hookpoints or self.cache.hookpoints
        missing = [h for h in self.hookpoints if h not in self.cache.widths]
        if missing:
            raise UserError(f"the activation cache {folder} has no hookpoint(s) {', '.join(missing)}; "
                            f"it has {', '.join(self.cache.hookpoints)}")
        self.transcode = self.cache.transcode
        self.widths = {h: self.cache.widths[h] for h in self.hookpoints}
        self.batch_tokens, self.seed = batch_tokens, seed
        self.tokens_per_batch = batch_tokens
        self.batches_per_epoch = self.cache.batches_per_epoch(batch_tokens)
        self.data_info = {"kind": self.kind, "fingerprint": f"{self.cache.total_tokens}:{len(self.cache.shards)}",
                          "num_chunks": self.cache.total_tokens, "tokens_per_batch": batch_tokens}

    def batches(self, start: int = 0) -> Iterator[dict[str, tuple[mx.array, mx.array]]]:
        for batch in self.cache.batches(self.batch_tokens, self.seed, start, self.hookpoints):
            out = {}
            for hook, (x, y) in batch.items():
                mx_x = to_mx(x)
                out[hook] = (mx_x, mx_x if y is x else to_mx(y))
            yield out


class ArrayActivationSource:
    """Activations handed over by the caller: an iterable of {hookpoint: x} or {hookpoint: (x, y)} batches of
    [N, d] arrays (NumPy, mx or torch). Resuming at batch b skips the first b batches, so pass the same iterable
    again."""

    kind = "arrays"

    def __init__(self, batches: Iterable[dict]):
        self._iter = iter(batches)
        first = next(self._iter, None)
        if first is None or not isinstance(first, dict) or not first:
            raise UserError("the activation iterable is empty or does not yield {hookpoint: array} dicts")
        self._first = self._convert(first)
        self.hookpoints = list(self._first)
        self.transcode = any(x is not y for x, y in self._first.values())
        self.widths = {h: (x.shape[-1], y.shape[-1]) for h, (x, y) in self._first.items()}
        self.tokens_per_batch = next(iter(self._first.values()))[0].shape[0]
        self.batches_per_epoch = None
        self.data_info = {"kind": self.kind, "fingerprint": None, "num_chunks": None,
                          "tokens_per_batch": self.tokens_per_batch}

    def _convert(self, batch: dict) -> dict[str, tuple[mx.array, mx.array]]:
        out = {}
        for hook, value in batch.items():
            x, y = value if isinstance(value, (tuple, list)) else (value, None)
            mx_x = to_mx(x)
            if mx_x.ndim != 2:
                raise UserError(f"activations for {hook!r} must be [N, d], got shape {tuple(mx_x.shape)}")
            out[hook] = (mx_x, mx_x if y is None else to_mx(y))
        return out

    def batches(self, start: int = 0) -> Iterator[dict[str, tuple[mx.array, mx.array]]]:
        batch = self._first
        for _ in range(start):
            batch = next(self._iter, None)
            if batch is None:
                return
        if start:
            batch = self._convert(batch)
        while batch is not None:
            yield batch
            nxt = next(self._iter, None)
            batch = None if nxt is None else self._convert(nxt)


# ---------------------------------------------------------------------------------------------------------------
# Model runners, and harvest: write an activation cache
# ---------------------------------------------------------------------------------------------------------------


def load_model_source(cfg, dtype: str | None = None):
    """The mlx-lm model runner (sae_core.loop.load_model_source): load cfg.model; returns (hookpoints,
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
    """Run cfg.model over cfg.dataset (one pass over the split, or cfg.max_tokens tokens) and store the
    hookpoints' activations as an activation cache (sae_core.activation_cache); the torch side's harvest, with
    the model run by `model_runner` (see the module docstring). The cache is framework-free: either backend
    trains on it."""
    import sys

    from tqdm.auto import tqdm

    from sae_core.activation_cache import CacheWriter
    from sae_core.data import default_exclude_tokens, load_token_chunks

    from sae_core.loop import load_model_source as load_with_runner

    from .trainer import MlxBackend

    cfg.validate()
    backend = MlxBackend(resolve_device(cfg.device), model_runner=model_runner)
    device = backend.device
    with mx.stream(device):
        hookpoints, make_source, tokenizer, _ = load_with_runner(cfg, backend)
    chunks = load_token_chunks(cfg.dataset, cfg.split, tokenizer, cfg.ctx_len, cfg.max_tokens, cfg.text_column)
    if cfg.max_tokens is not None:
        chunks = chunks[: max(1, -(-cfg.max_tokens // cfg.ctx_len))]
    exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
    batch_size = min(cfg.batch_size, len(chunks))
    with mx.stream(device):
        source = make_source(chunks, exclude, batch_size)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.split, "ctx_len": cfg.ctx_len,
            "exclude_tokens": exclude, "data_fingerprint": source.data_info["fingerprint"]}
    writer = CacheWriter(Path(out).expanduser(), source.widths, cfg.sae.transcode, save_dtype, shard_tokens, meta,
                         overwrite)
    bar = tqdm(total=len(chunks) * cfg.ctx_len, unit="tok", unit_scale=True, desc="Harvesting",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(chunks), batch_size):  # in data order: the cache reader shuffles
        tokens = chunks[start: start + batch_size]
        with mx.stream(device):
            acts = source.activations(tokens)
        kept = tokens.reshape(-1)[exclude_mask(tokens, exclude).reshape(-1)]
        writer.add(kept, {h: (to_numpy(x.astype(mx.float32)), to_numpy(y.astype(mx.float32)))
                          for h, (x, y) in acts.items()})
        bar.update(tokens.size)
    bar.close()
    return writer.close()


__all__ = ["ArrayActivationSource", "CacheActivationSource", "ModelActivationSource",
           "capture", "choose_model_runner", "harvest", "load_model", "load_model_source", "model_widths",
           "resolve_device", "resolve_dtype", "resolve_hookpoints", "run_forward", "to_mx", "to_numpy"]
