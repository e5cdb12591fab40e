"""Activation caches written by `sae harvest` and streamed by the trainer: safetensors shards + a JSON manifest.

A cache folder:

Design notes: docs/internals.md, section `sae_core/activation_cache.py`.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .checkpoint import (FLOAT_DTYPES, load_safetensors_numpy, make_staging_dir, read_header, read_json,
                         release_staging_dir, save_safetensors_numpy, write_text_atomic)
from .errors import CheckpointError, UserError

MANIFEST = "manifest.json"
FORMAT = "sae-twins/activations"
VERSION = 1


class CacheWriter:
    """Writes a cache into a staging folder beside `folder`; `close()` renames it into place (swapping out an old
    cache with overwrite=True), so nothing at `folder` changes before the new cache is complete."""

    def __init__(self, folder: Path, widths: dict[str, tuple[int, int]], transcode: bool, dtype: str = "float32",
                 shard_tokens: int = 65536, meta: dict | None = None, overwrite: bool = False):
        self.folder = Path(folder)
        if self.folder.is_symlink():
            raise UserError(f"{self.folder} is a symbolic link: give the folder itself")
        if (self.folder / MANIFEST).exists() and not overwrite:
            raise UserError(f"{self.folder} already holds an activation cache; pass --overwrite or choose another "
                            f"folder")
        if self.folder.exists():
            if not self.folder.is_dir():
                raise UserError(f"{self.folder} exists and is not a folder")
            others = sorted(p.name for p in self.folder.iterdir()
                            if p.name != MANIFEST and not SHARD_NAME.fullmatch(p.name))
            if others:  # replacing the folder would delete them
                raise UserError(f"{self.folder} holds files that are not part of an activation cache "
                                f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); choose another folder")
        self.staging = make_staging_dir(self.folder, "partial")
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
        save_safetensors_numpy(self.staging / name, tensors)
        self.shards.append({"file": name, "tokens": int(n), "sha256": _tensors_hash(tensors)})
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
            self.abort()
            raise UserError("no activations were harvested (every token excluded, or no data)")
        manifest = {"format": FORMAT, "version": VERSION, "transcode": self.transcode, "dtype": self.dtype,
                    "hookpoints": {h: {"d_in": d_in, "d_out": d_out} for h, (d_in, d_out) in self.widths.items()},
                    "total_tokens": self.total, "shards": self.shards, **self.meta}
        write_text_atomic(self.staging / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        old = None
        if self.folder.exists():  # the old cache (or an unfinished one): out of the way in one rename
            old = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".old", dir=self.folder.parent))
            os.replace(self.folder, old / "cache")
        os.replace(self.staging, self.folder)
        release_staging_dir(self.staging)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        """Remove the staging folder (the old cache, if any, was never touched)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        release_staging_dir(self.staging)


SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


def _tensors_hash(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + str(tensors[name].dtype).encode() + str(tensors[name].shape).encode())
        digest.update(np.ascontiguousarray(tensors[name]).view(np.uint8).tobytes())
    return digest.hexdigest()


def _is_layer(hookpoint: str, index: int) -> bool:
    return re.fullmatch(rf"(?:.+\.)?[A-Za-z_]\w*\.{index}", hookpoint) is not None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def cache_hookpoints(cfg) -> list[str]:
    """The hookpoints of cfg.activations that a TrainConfig asks for (its hookpoints, layers and layer_stride):
    what a trainer passes to its cache activation source."""
    return ActivationCache(cfg.activations).select_hookpoints(cfg.hookpoints, cfg.layers, cfg.layer_stride)


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
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; a cache's files must lie inside its folder")
        self.manifest = read_json(path, "an activation cache manifest", UserError)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise UserError(f"{path}: not an activation cache manifest")
        try:
            self.transcode = bool(self.manifest["transcode"])
            self.widths = {h: (int(w["d_in"]), int(w["d_out"])) for h, w in self.manifest["hookpoints"].items()}
            self.shards = [{**s, "file": str(s["file"]), "tokens": int(s["tokens"])} for s in self.manifest["shards"]]
            self.total_tokens = int(self.manifest["total_tokens"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: malformed manifest ({type(e).__name__}: {e}); harvest the cache again") from None
        self.hookpoints = list(self.widths)
        if sum(s["tokens"] for s in self.shards) != self.total_tokens:
            raise UserError(f"{path}: total_tokens {self.total_tokens} is not the sum of the shards' tokens "
                            f"({sum(s['tokens'] for s in self.shards)}); harvest the cache again")
        for shard in self.shards:
            self._check_shard(shard)
        self._loaded: dict[int, dict[str, np.ndarray]] = {}

    def _check_shard(self, shard: dict) -> None:
        """The shard is a plain file inside the folder and its header matches the manifest (headers only: cheap)."""
        name = shard["file"]
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise UserError(f"{self.folder / MANIFEST}: shard {name!r} is not a plain file name inside the cache "
                            f"(absolute paths and '..' are refused: a cache must not read files outside its folder)")
        path = self.folder / name
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; a cache's shards must lie inside its folder")
        if not path.is_file():
            raise UserError(f"{self.folder}: shard {name} listed in the manifest is missing")
        try:
            header, _ = read_header(path)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        problems = []
        if "tokens" in header and header["tokens"]["shape"] != [shard["tokens"]]:
            problems.append(f"it holds {header['tokens']['shape']} token ids, the manifest says {shard['tokens']}")
        for hook, (d_in, d_out) in self.widths.items():
            for key, width in [(f"{hook}.x", d_in)] + ([(f"{hook}.y", d_out)] if self.transcode else []):
                if key not in header:
                    problems.append(f"no tensor {key!r}")
                elif header[key]["shape"] != [shard["tokens"], width]:
                    problems.append(f"{key!r} has shape {header[key]['shape']}, the manifest implies "
                                    f"{[shard['tokens'], width]}")
                elif header[key]["dtype"] not in FLOAT_DTYPES:
                    problems.append(f"{key!r} has dtype {header[key]['dtype']}, expected a float type")
        if problems:
            raise UserError(f"{path}: does not match {MANIFEST}: {'; '.join(problems)}. The cache is damaged or was "
                            f"edited: harvest it again")

    @property
    def fingerprint(self) -> str:
        """A hash of the manifest, which names the data, the model, the hookpoints and (in caches written since
        shards carry one) each shard's content hash: a resumed run checks it to train on the same cache."""
        text = json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
        return "manifest:" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def data_info(self, batch_tokens: int) -> dict:
        """The `data` entry of a run's state.json for a run trained on this cache."""
        return {"kind": "cache", "fingerprint": self.fingerprint, "num_chunks": self.total_tokens,
                "tokens_per_batch": batch_tokens}

    def select_hookpoints(self, patterns: list[str] | None = None, layers: list[int] | None = None,
                          layer_stride: int = 1) -> list[str]:
        """The cache's hookpoints that `--hookpoints` (fnmatch patterns) or `--layers` (indices, which match the
        cache's `<layer list>.<i>` names, e.g. layers.3 or h.3) ask for, every layer_stride-th; all when neither
        is given. Refuses what the cache does not hold rather than training something else."""
        names = self.hookpoints
        if layers:
            missing = [i for i in layers if not any(_is_layer(h, i) for h in names)]
            if missing:
                raise UserError(f"the activation cache {self.folder} holds no hookpoint for layer(s) "
                                f"{', '.join(map(str, missing))} (--layers); it has {', '.join(names)}: train on "
                                f"those, or harvest the layers you want")
            chosen = [h for h in names if any(_is_layer(h, i) for i in layers)]
        elif patterns:
            missing = [p for p in patterns if not any(fnmatch.fnmatchcase(h, p) for h in names)]
            if missing:
                raise UserError(f"the activation cache {self.folder} has no hookpoint matching "
                                f"{', '.join(map(repr, missing))}; it has {', '.join(names)}")
            chosen = [h for h in names if any(fnmatch.fnmatchcase(h, p) for p in patterns)]
        else:
            chosen = list(names)
        return sorted(chosen, key=_natural_key)[::layer_stride]

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
