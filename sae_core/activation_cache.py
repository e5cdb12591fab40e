"""Activation caches written by `sae harvest` and streamed by the trainer: safetensors shards + a JSON manifest.

A cache folder:

    manifest.json           {"format": "sae-twins/activations", "version": 1, "transcode": bool, "dtype": "float32",
                             "hookpoints": {hook: {"d_in": int, "d_out": int}}, "total_tokens": int,
                             "shards": [{"file": "shard-00000.safetensors", "tokens": int}, ...],
                             "model", "dataset", "split", "ctx_len", "exclude_tokens", ...: provenance}
    shard-00000.safetensors  tokens [N] int32 (the token ids), <hook>.x [N, d_in], and <hook>.y [N, d_out] only for
                             transcoders (an autoencoder's target is its input)

Excluded tokens are already dropped. The manifest is written last, so a folder without one is an unfinished
harvest. Reading is framework-free (NumPy) and streams: only the shard(s) a batch touches are in memory.
Batch order: epoch e visits the shards in `default_rng([seed, e]).permutation(num_shards)` order and the rows of
shard s in `default_rng([seed, e, s]).permutation(rows)` order; batches are consecutive blocks of batch_tokens
rows of that sequence (a tail shorter than batch_tokens is skipped), so batch b is a function of (b, seed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from .checkpoint import load_safetensors_numpy, save_safetensors_numpy, write_text_atomic
from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = "sae-twins/activations"
VERSION = 1


class CacheWriter:
    def __init__(self, folder: Path, widths: dict[str, tuple[int, int]], transcode: bool, dtype: str = "float32",
                 shard_tokens: int = 65536, meta: dict | None = None, overwrite: bool = False):
        self.folder = Path(folder)
        if (self.folder / MANIFEST).exists() and not overwrite:
            raise UserError(f"{self.folder} already holds an activation cache; pass --overwrite or choose another "
                            f"folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("shard-*.safetensors"):
            old.unlink()
        (self.folder / MANIFEST).unlink(missing_ok=True)
        self.widths, self.transcode, self.dtype = widths, transcode, dtype
        self.shard_tokens, self.meta = shard_tokens, dict(meta or {})
        self.shards: list[dict] = []
        self._buffer: list[tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]] = []
        self._buffered = 0
        self.total = 0

    def add(self, tokens: np.ndarray, acts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Add N tokens' activations: tokens [N], acts {hook: (x [N, d_in], y [N, d_out])} as NumPy arrays."""
        self._buffer.append((np.asarray(tokens, np.int32), acts))
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        tokens = np.concatenate([t for t, _ in self._buffer])
        merged = {h: (np.concatenate([a[h][0] for _, a in self._buffer]),
                      np.concatenate([a[h][1] for _, a in self._buffer]) if self.transcode else None)
                  for h in self.widths}
        tensors = {"tokens": tokens[:n]}
        for h, (x, y) in merged.items():
            tensors[f"{h}.x"] = x[:n].astype(self._np_dtype())
            if self.transcode:
                tensors[f"{h}.y"] = y[:n].astype(self._np_dtype())
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_safetensors_numpy(self.folder / name, tensors)
        self.shards.append({"file": name, "tokens": int(n)})
        self.total += n
        rest = len(tokens) - n
        self._buffer = [] if rest == 0 else [(tokens[n:], {h: (x[n:], y[n:] if y is not None else None)
                                                           for h, (x, y) in merged.items()})]
        self._buffered = rest

    def _np_dtype(self):
        if self.dtype == "bfloat16":
            import ml_dtypes

            return ml_dtypes.bfloat16
        return np.dtype(self.dtype)

    def close(self) -> dict:
        if self._buffered:
            self._flush(self._buffered)
        if not self.shards:
            raise UserError("no activations were harvested (every token excluded, or no data)")
        manifest = {"format": FORMAT, "version": VERSION, "transcode": self.transcode, "dtype": self.dtype,
                    "hookpoints": {h: {"d_in": d_in, "d_out": d_out} for h, (d_in, d_out) in self.widths.items()},
                    "total_tokens": self.total, "shards": self.shards, **self.meta}
        write_text_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return manifest


class ActivationCache:
    """Read side: the manifest, and batches streamed shard by shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        path = self.folder / MANIFEST
        if not self.folder.is_dir():
            raise UserError(f"activation cache {self.folder} not found")
        if not path.is_file():
            raise UserError(f"{self.folder} holds no {MANIFEST}: not an activation cache, or an unfinished harvest "
                            f"(run `sae harvest` again)")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path}: not valid JSON") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{path}: not an activation cache manifest")
        self.transcode = bool(self.manifest["transcode"])
        self.widths = {h: (w["d_in"], w["d_out"]) for h, w in self.manifest["hookpoints"].items()}
        self.hookpoints = list(self.widths)
        self.shards = self.manifest["shards"]
        self.total_tokens = int(self.manifest["total_tokens"])
        for shard in self.shards:
            if not (self.folder / shard["file"]).is_file():
                raise UserError(f"{self.folder}: shard {shard['file']} listed in the manifest is missing")
        self._loaded: dict[int, dict[str, np.ndarray]] = {}

    def batches_per_epoch(self, batch_tokens: int) -> int:
        return self.total_tokens // batch_tokens

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._loaded:
            if len(self._loaded) >= 2:
                self._loaded.pop(next(iter(self._loaded)))
            tensors, _ = load_safetensors_numpy(self.folder / self.shards[index]["file"])
            self._loaded[index] = tensors
        return self._loaded[index]

    def batches(self, batch_tokens: int, seed: int, start: int = 0,
                hookpoints: list[str] | None = None) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Yield {hook: (x, y)} NumPy batches of batch_tokens rows from batch number `start` on, forever."""
        per_epoch = self.batches_per_epoch(batch_tokens)
        if per_epoch == 0:
            raise UserError(f"the activation cache holds {self.total_tokens} tokens, fewer than one batch of "
                            f"{batch_tokens}: lower batch_size or ctx_len, or harvest more")
        hookpoints = hookpoints or self.hookpoints
        sizes = np.array([s["tokens"] for s in self.shards])
        position = start
        while True:
            epoch, b = divmod(position, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
            ends = np.cumsum(sizes[order])
            lo, hi = b * batch_tokens, (b + 1) * batch_tokens
            parts: dict[str, list] = {h: [] for h in hookpoints}
            ys: dict[str, list] = {h: [] for h in hookpoints}
            for slot, shard_index in enumerate(order):
                s_lo = int(ends[slot] - sizes[shard_index])
                s_hi = int(ends[slot])
                if s_hi <= lo or s_lo >= hi:
                    continue
                rows = np.random.default_rng([seed, epoch, int(shard_index)]).permutation(int(sizes[shard_index]))
                rows = np.sort(rows[max(lo, s_lo) - s_lo: min(hi, s_hi) - s_lo])
                tensors = self._shard(int(shard_index))
                for h in hookpoints:
                    parts[h].append(tensors[f"{h}.x"][rows])
                    if self.transcode:
                        ys[h].append(tensors[f"{h}.y"][rows])
            out = {}
            for h in hookpoints:
                x = np.concatenate(parts[h])
                out[h] = (x, np.concatenate(ys[h]) if self.transcode else x)
            yield out
            position += 1
