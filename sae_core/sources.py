"""The framework-free parts of the activation sources and model runners, shared by sae_torch.activations and
sae_mlx.activations. Every source yields batches `{hookpoint: (x, y)}` of [N, d] arrays of its backend (N tokens,
excluded tokens already dropped; y is x for an autoencoder, the module's output for a transcoder whose x is the
module's input), can start at any batch number (how a run resumes), and has `hookpoints`, `widths`, `transcode`,
`tokens_per_batch`, `batches_per_epoch` and `data_info` (the same on both backends, so a checkpoint written by one
resumes on the other)."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .activation_cache import ActivationCache
from .data import BatchOrder, exclude_mask, fingerprint, token_batches
from .errors import UserError
from .train_config import default_layer


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resolve_hookpoint_names(names: list[str], patterns: list[str], layers: list[int] | None, layer_stride: int,
                            layer_prefix: Callable[[], str], layer_count: Callable[[str], int]) -> list[str]:
    """Module names matching `patterns` (fnmatch) or `layers` (indices into the layer list `layer_prefix()`, of
    `layer_count(prefix)` layers); default: train_config.default_layer. Every `layer_stride`-th is kept."""
    if layers:
        prefix = layer_prefix()
        count = layer_count(prefix)
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise UserError(f"layer(s) {bad} out of range: the model has {count} layers (0..{count - 1})")
        patterns = [f"{prefix}.{i}" for i in layers]
    elif not patterns:
        prefix = layer_prefix()
        patterns = [f"{prefix}.{default_layer(layer_count(prefix))}"]
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


class ModelSource:
    """Activations of a language model on token chunks, batch_size sequences per batch, in data.py's order. A
    backend provides `model_widths()`, `activations(tokens)`, `concat(arrays)`, `split_rows(x, counts)` (owned
    copies) and `nbytes(x)`.

    Chunks seen again in a later epoch are not run through the model twice: each chunk's activations are kept
    (up to memo_bytes in all, default 1 GiB) and reused. Outputs per sequence do not depend on the other
    sequences of a batch (tests check this bit for bit), so a resumed run, which starts with an empty memo,
    trains on identical data.
    """

    kind = "model"

    def __init__(self, model, hookpoints: list[str], chunks: np.ndarray, batch_size: int, seed: int,
                 transcode: bool, exclude_tokens: list[int], memo_bytes: int = 2**30):
        self.model, self.hookpoints, self.chunks = model, hookpoints, chunks
        self.batch_size, self.seed, self.transcode = batch_size, seed, transcode
        self.exclude_tokens = list(exclude_tokens)
        self.widths = self.model_widths()
        self.tokens_per_batch = batch_size * chunks.shape[1]
        self.batches_per_epoch = len(chunks) // batch_size
        self.data_info = {"kind": self.kind, "fingerprint": fingerprint(chunks), "num_chunks": int(len(chunks)),
                          "tokens_per_batch": self.tokens_per_batch}
        self.memo: dict[int, dict] = {}
        self.memo_left = memo_bytes

    def batches(self, start: int = 0) -> Iterator[dict]:
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

    def _concat(self, parts: list[tuple]) -> tuple:
        x = self.concat([p[0] for p in parts])
        return x, (x if parts[0][1] is parts[0][0] else self.concat([p[1] for p in parts]))

    def _remember(self, index: list[int], tokens: np.ndarray, acts: dict) -> None:
        counts = exclude_mask(tokens, self.exclude_tokens).sum(1).tolist()
        size = sum(self.nbytes(x) + (0 if y is x else self.nbytes(y)) for x, y in acts.values())
        if size > self.memo_left:
            return
        self.memo_left -= size
        split = {h: (self.split_rows(x, counts), None if y is x else self.split_rows(y, counts))
                 for h, (x, y) in acts.items()}
        for n, i in enumerate(index):
            self.memo.setdefault(i, {h: (xs[n], xs[n] if ys is None else ys[n]) for h, (xs, ys) in split.items()})


class CacheSource:
    """Batches of batch_tokens rows streamed from an activation cache (sae_core.activation_cache), converted by
    `convert` ({hook: (x, y)} of NumPy arrays -> the backend's). `hookpoints`: fnmatch patterns, as for a model."""

    kind = "cache"

    def __init__(self, folder: str | Path, batch_tokens: int, seed: int, convert: Callable[[dict], dict],
                 hookpoints: list[str] | None = None):
        self.cache = ActivationCache(folder)
        self.hookpoints = list(self.cache.hookpoints)
        if hookpoints:
            missing = [p for p in hookpoints if not any(fnmatch.fnmatchcase(h, p) for h in self.cache.hookpoints)]
            if missing:
                raise UserError(f"the activation cache {folder} has no hookpoint matching "
                                f"{', '.join(map(repr, missing))}; it has {', '.join(self.cache.hookpoints)}")
            self.hookpoints = [h for h in self.cache.hookpoints if any(fnmatch.fnmatchcase(h, p) for p in hookpoints)]
        self.transcode = self.cache.transcode
        self.widths = {h: self.cache.widths[h] for h in self.hookpoints}
        self.batch_tokens, self.seed, self._convert = batch_tokens, seed, convert
        self.tokens_per_batch = batch_tokens
        self.batches_per_epoch = self.cache.batches_per_epoch(batch_tokens)
        self.data_info = self.cache.data_info(batch_tokens)

    def batches(self, start: int = 0) -> Iterator[dict]:
        for batch in self.cache.batches(self.batch_tokens, self.seed, start, self.hookpoints):
            yield self._convert(batch)


class ArraySource:
    """Activations handed over by the caller: an iterable of {hookpoint: x} or {hookpoint: (x, y)} batches of
    [N, d] arrays (NumPy or either framework's), converted one by one by `convert`. Resuming at batch b skips the
    first b batches, so pass the same iterable again."""

    kind = "arrays"

    def __init__(self, batches: Iterable[dict], convert: Callable):
        self._iter, self._to_array = iter(batches), convert
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

    def _convert(self, batch: dict) -> dict:
        out = {}
        for hook, value in batch.items():
            x, y = value if isinstance(value, (tuple, list)) else (value, None)
            x = self._to_array(x)
            if x.ndim != 2:
                raise UserError(f"activations for {hook!r} must be [N, d], got shape {tuple(x.shape)}")
            out[hook] = (x, x if y is None else self._to_array(y))
        return out

    def batches(self, start: int = 0) -> Iterator[dict]:
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


class ShardedSource:
    """Data parallel: the same global batch order and position on every rank, each rank gets its contiguous slice.
    A language-model source is sliced by sequences before the model runs (each rank runs the model on its part)."""

    def __init__(self, source, rank: int, world: int, mean):
        self._source, self.rank, self.world, self._mean = source, rank, world, mean
        self.first_mean: dict = {}  # {hook: mean of the first global batch's y}, when every rank has the batch

    def __getattr__(self, name):  # hookpoints, widths, tokens_per_batch (global), batches_per_epoch, data_info, ...
        return getattr(self._source, name)

    def _bounds(self, n: int) -> tuple[int, int]:
        cuts = np.linspace(0, n, self.world + 1).round().astype(int)
        return int(cuts[self.rank]), int(cuts[self.rank + 1])

    def batches(self, start: int = 0):
        src = self._source
        if getattr(src, "kind", None) == "model":
            for tokens in token_batches(src.chunks, src.batch_size, src.seed, start):
                lo, hi = self._bounds(len(tokens))
                yield src.activations(tokens[lo:hi])
            return
        for number, batch in enumerate(src.batches(start=start), start):
            out = {}
            for hook, (x, y) in batch.items():
                if number == 0:  # b_dec's initial value, computed exactly as a 1-rank run does
                    self.first_mean[hook] = self._mean(y)
                lo, hi = self._bounds(x.shape[0])
                out[hook] = (x[lo:hi], x[lo:hi] if y is x else y[lo:hi])
            yield out


class ConvertedSource:
    """A model runner's activation source (e.g. torch's transformers runner for the MLX backend) whose batches are
    converted to another backend's arrays; same data order and data_info."""

    def __init__(self, source, convert):
        self.inner, self._convert = source, convert

    def __getattr__(self, name):  # kind, hookpoints, widths, chunks, batch_size, seed, data_info, ...
        return getattr(self.inner, name)

    def batches(self, start: int = 0):
        for batch in self.inner.batches(start=start):
            yield self._convert(batch)

    def activations(self, tokens: np.ndarray) -> dict:
        return self._convert(self.inner.activations(tokens))


def load_model_source(cfg, backend, runner: str | None = None, dtype: str | None = None):
    """Load cfg.model with a model runner (`sae_<runner>.activations`, found by name so that no backend imports
    the other); returns (hookpoints, make_source(chunks, exclude_tokens, batch_size=None), tokenizer, dtype name)
    with the source's batches in `backend`'s arrays. `dtype` (a name) overrides cfg.dtype."""
    runner = runner or backend.model_runner(cfg)
    try:
        module = importlib.import_module(f"sae_{runner}.activations")
    except ModuleNotFoundError as e:
        raise UserError(f"the {runner} model runner needs the package {e.name!r}; install it or choose another "
                        f"runner") from None
    hookpoints, make, tokenizer, dtype = module.load_model_source(cfg, dtype)
    if runner == backend.name:
        return hookpoints, make, tokenizer, dtype
    return hookpoints, (lambda *a, **kw: ConvertedSource(make(*a, **kw), backend.convert_batch)), tokenizer, dtype


def harvest(out: str | Path, cfg, backend, *, save_dtype: str = "float32", shard_tokens: int = 65536,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Run cfg.model over cfg.dataset (one pass over the split, or cfg.max_tokens tokens) with the backend's model
    runner (`load_model_source`) and store the hookpoints' activations as an activation cache
    (sae_core.activation_cache), which either backend trains on."""
    from tqdm.auto import tqdm

    from .activation_cache import CacheWriter
    from .data import default_exclude_tokens, load_token_chunks
    cfg.validate()
    with backend.scope():
        hookpoints, make_source, tokenizer, _ = load_model_source(cfg, backend)
        chunks = load_token_chunks(cfg.dataset, cfg.split, tokenizer, cfg.ctx_len, cfg.max_tokens, cfg.text_column)
        if cfg.max_tokens is not None:
            chunks = chunks[: max(1, -(-cfg.max_tokens // cfg.ctx_len))]
        exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
        batch_size = min(cfg.batch_size, len(chunks))
        source = make_source(chunks, exclude, batch_size)
        meta = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.split, "ctx_len": cfg.ctx_len,
                "exclude_tokens": exclude, "data_fingerprint": source.data_info["fingerprint"]}
        writer = CacheWriter(Path(out).expanduser(), source.widths, cfg.sae.transcode, save_dtype, shard_tokens,
                             meta, overwrite)
        bar = tqdm(total=len(chunks) * cfg.ctx_len, unit="tok", unit_scale=True, desc="Harvesting",
                   disable=not progress, file=sys.stderr)
        for start in range(0, len(chunks), batch_size):  # in data order: the cache reader shuffles
            tokens = chunks[start: start + batch_size]
            acts = source.activations(tokens)
            kept = tokens.reshape(-1)[exclude_mask(tokens, exclude).reshape(-1)]
            writer.add(kept, {h: (backend.to_numpy(x).astype(np.float32), backend.to_numpy(y).astype(np.float32))
                              for h, (x, y) in acts.items()})
            bar.update(tokens.size)
        bar.close()
    return writer.close()
