"""A re-runnable fault and bad-input audit (issue #14): try many bad inputs and faults, count how many are handled well.

    python scripts/fault_audit.py [--json OUT.json] [--quick]

"Handled well" means, per kind of case:
  * API calls (SparseCoder forward/encode/decode, both backends): a ValueError/TypeError that is also a UserError,
    one line, naming the argument, and the same type and message in torch and MLX.
  * Files (checkpoints, caches, run folders): a CheckpointError/UserError naming the file, in every loader (NumPy,
    torch, MLX); never a raw IndexError/KeyError/RuntimeError/RecursionError or a silent load.
  * Hostile run folders: the error above, and nothing outside the run folder changed.
  * CLI runs (real processes): exit 2 for user mistakes, 1 for failed writes, 130 after SIGTERM, one line on stderr
    and no traceback; the checkpoint on disk loads and resumes afterwards.
Real files, real processes and signals throughout; nothing is mocked. Prints a table and, with --json, the cases.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sae_core.activation_cache import MANIFEST, ActivationCache, CacheWriter  # noqa: E402
from sae_core.checkpoint import load_checkpoint_numpy, load_safetensors_numpy, save_safetensors_numpy  # noqa: E402
from sae_core.errors import UserError  # noqa: E402
from sae_core.training_state import read_run_state  # noqa: E402

D, M = 16, 64
HAVE = {b: importlib.util.find_spec(m) is not None for b, m in (("torch", "torch"), ("mlx", "mlx.core"))}
BACKENDS = [b for b in ("torch", "mlx") if HAVE[b]]
RESULTS: list[dict] = []


def record(category: str, case: str, ok: bool, detail: str) -> None:
    RESULTS.append({"category": category, "case": case, "ok": bool(ok), "detail": detail[:300]})
    print(f"  {'ok  ' if ok else 'FAIL'} {category}: {case}: {detail[:160]}", flush=True)


def clear(error: BaseException) -> bool:
    """A clear, one-line user-facing error (what the CLI prints without a traceback)."""
    return isinstance(error, UserError) and bool(str(error).strip()) and "\n" not in str(error).strip()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures made once: a cache, a trained run
# ---------------------------------------------------------------------------------------------------------------

def make_cache(folder: Path, seed: int = 0, constant: bool = False, overwrite: bool = False) -> None:
    rng = np.random.default_rng(seed)
    writer = CacheWriter(folder, {"layers.7": (D, D)}, False, shard_tokens=640,
                         meta={"model": "synthetic", "data_fingerprint": f"seed{seed}"}, overwrite=overwrite)
    basis = rng.standard_normal((4, D)).astype(np.float32)
    for start in range(0, 1280, 320):
        x = (rng.standard_normal((320, 4)) @ basis + 0.1 * rng.standard_normal((320, D))).astype(np.float32)
        writer.add(np.arange(start, start + 320), {"layers.7": (np.ones_like(x) if constant else x, None)})
    writer.close()


def cli(args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sae_core.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def train_args(cache: Path, save_dir: Path, run: str, backend: str = "torch", steps: int = 4, extra=()) -> list:
    return ["train", "--backend", backend, "--activations", cache, "--save_dir", save_dir, "--run_name", run,
            "--batch_size", 4, "--ctx_len", 16, "--max_tokens", 64 * steps, "--k", 4, "--expansion_factor", 4,
            "--save_every", 2, "--log_every", 1, "--quiet", "--no-plots", *extra]


def one_line(result: subprocess.CompletedProcess, code: int) -> tuple[bool, str]:
    lines = result.stderr.strip().splitlines()
    ok = result.returncode == code and "Traceback" not in result.stderr and len(lines) == 1 and \
        lines[0].startswith("error: ")
    return ok, f"exit {result.returncode}: {lines[-1] if lines else '(no stderr)'}"


# ---------------------------------------------------------------------------------------------------------------
# A. The SparseCoder API, both backends
# ---------------------------------------------------------------------------------------------------------------

def audit_api() -> None:
    from sae_core.config import SparseCoderConfig

    def coder(backend):
        cfg = SparseCoderConfig(k=4, num_latents=M)
        if backend == "torch":
            import torch
            from sae_torch.sparse_coder import SparseCoder

            torch.manual_seed(0)
            return SparseCoder(D, cfg)
        from sae_mlx.sparse_coder import SparseCoder

        return SparseCoder(D, cfg)

    def arr(backend, value, dtype="float32"):
        value = np.asarray(value)
        if backend == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(value)).to(getattr(torch, dtype))
        import mlx.core as mx

        return mx.array(value).astype(getattr(mx, "bool_" if dtype == "bool" else dtype))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, D)).astype(np.float32)
    idx = np.array([[0, 1, 2], [3, 4, 5]])
    cases = {}
    for shape in [(D,), (1, 6, D), (6, D - 1), (6, D + 1), (6, 0), (0, D), (2, 3, 4, D)]:
        cases[f"forward x of shape {shape}"] = ("forward", lambda b, s=shape: (arr(b, np.zeros(s, np.float32) +
                                                                                   rng.standard_normal(s)),))
    for dtype in ["float64", "int32", "int64", "bool", "uint8", "int8"]:
        cases[f"forward x of dtype {dtype}"] = ("forward", lambda b, d=dtype: (arr(b, x * 3, d),))
    for kind, value in [("NumPy array", x), ("list", x.tolist()), ("None", None), ("float", 1.0), ("string", "x")]:
        cases[f"forward x as {kind}"] = ("forward", lambda b, v=value: (v,))
        cases[f"encode x as {kind}"] = ("encode", lambda b, v=value: (v,))
    for shape in [(5, D), (6, D + 1), (6,), (6, D, 1)]:
        cases[f"forward y of shape {shape}"] = ("forward", lambda b, s=shape: (arr(b, x), arr(b, np.ones(s) +
                                                                                           rng.standard_normal(s))))
    cases["forward 1 token"] = ("forward", lambda b: (arr(b, x[:1]),))
    cases["forward constant batch"] = ("forward", lambda b: (arr(b, np.ones((6, D))),))
    cases["forward NaN in x"] = ("forward", lambda b: (arr(b, np.where(np.eye(6, D) > 0, np.nan, x)),))
    cases["forward Inf in y"] = ("forward", lambda b: (arr(b, x), arr(b, np.where(np.eye(6, D) > 0, np.inf, x))))
    for n in [M - 1, M + 1, 2 * M, 0, 1]:
        cases[f"dead_mask of length {n}"] = ("forward", lambda b, n=n: (arr(b, x), None,
                                                                         arr(b, np.arange(n) % 2 == 0, "bool")))
    for dtype in ["int32", "float32", "uint8"]:
        cases[f"dead_mask of dtype {dtype}"] = ("forward", lambda b, d=dtype: (arr(b, x), None,
                                                                                arr(b, np.ones(M), d)))
    cases["dead_mask 2-D"] = ("forward", lambda b: (arr(b, x), None, arr(b, np.ones((1, M)), "bool")))
    cases["dead_mask NumPy"] = ("forward", lambda b: (arr(b, x), None, np.ones(M, bool)))
    for bad in [M, M + 7, 10 * M, -1, -M, 2**31 - 1]:
        cases[f"decode index {bad}"] = ("decode", lambda b, v=bad: (arr(b, np.ones((2, 3))),
                                                                    arr(b, np.where(idx == 5, v, idx), "int64")))
    cases["decode float indices"] = ("decode", lambda b: (arr(b, np.ones((2, 3))), arr(b, idx, "float32")))
    cases["decode shape mismatch"] = ("decode", lambda b: (arr(b, np.ones((2, 3))), arr(b, idx[:, :2], "int32")))
    cases["decode 1-D"] = ("decode", lambda b: (arr(b, np.ones(3)), arr(b, idx[0], "int32")))
    cases["decode int acts"] = ("decode", lambda b: (arr(b, np.ones((2, 3)), "int32"), arr(b, idx, "int32")))
    cases["decode NumPy"] = ("decode", lambda b: (np.ones((2, 3), np.float32), idx))
    cases["encode wrong width"] = ("encode", lambda b: (arr(b, x[:, :5]),))
    cases["encode 3-D"] = ("encode", lambda b: (arr(b, x[None]),))

    for name, (method, build) in cases.items():
        outcomes = {}
        for backend in BACKENDS:
            try:
                sae, args = coder(backend), build(backend)
                if method == "forward":
                    xa, ya, mask = (list(args) + [None, None])[:3]
                    out = sae(xa, ya, dead_mask=mask)
                    fvu = float(out.fvu.detach() if hasattr(out.fvu, "detach") else out.fvu)
                    outcomes[backend] = ("returned", f"fvu {fvu}")
                else:
                    getattr(sae, method)(*args)
                    outcomes[backend] = ("returned", "")
            except Exception as e:  # noqa: BLE001 -- what is raised is the point
                outcomes[backend] = (type(e).__name__, str(e), clear(e) and isinstance(e, (ValueError, TypeError)))
        values = list(outcomes.values())
        ok = all(len(v) == 3 and v[2] for v in values) and len({v[:2] for v in values}) == 1
        detail = " | ".join(f"{b}: {v[0]}: {v[1]}" for b, v in outcomes.items())
        record("API (both backends)", name, ok, detail)


# ---------------------------------------------------------------------------------------------------------------
# B. Checkpoint files, every loader
# ---------------------------------------------------------------------------------------------------------------

def loaders():
    out = {"numpy": load_checkpoint_numpy}
    if HAVE["torch"]:
        from sae_torch.sparse_coder import SparseCoder as T

        out["torch"] = T.load_from_disk
    if HAVE["mlx"]:
        from sae_mlx.sparse_coder import SparseCoder as X

        out["mlx"] = X.load_from_disk
    return out


def raw_layout(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    names = {"float32": "F32", "float16": "F16", "float64": "F64", "int32": "I32"}
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": names[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def write_raw(path: Path, header: dict, data: bytes, pad: bool = True) -> None:
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def audit_checkpoints(run: Path, work: Path) -> None:
    source = run / "layers.7"
    tensors, _ = load_safetensors_numpy(source / "sae.safetensors")
    size = (source / "sae.safetensors").stat().st_size
    cases = {}

    def header_edit(fn):
        def apply(folder):
            header, data = raw_layout(tensors)
            fn(header)
            write_raw(folder / "sae.safetensors", header, data)
        return apply

    for cut in [0, 4, 8, 20, 100, size // 2, size - 1]:
        cases[f"sae.safetensors truncated to {cut} bytes"] = lambda f, c=cut: (f / "sae.safetensors").write_bytes(
            (f / "sae.safetensors").read_bytes()[:c])
    cases["trailing bytes"] = lambda f: (f / "sae.safetensors").write_bytes((f / "sae.safetensors").read_bytes()
                                                                            + b"\0" * 64)
    for name in ["W_dec", "b_dec", "encoder.bias"]:
        cases[f"{name}: float shape"] = header_edit(lambda h, n=name: h[n].update(shape=[float(s) for s in
                                                                                          h[n]["shape"]]))
        cases[f"{name}: negative shape"] = header_edit(lambda h, n=name: h[n].update(shape=[-1] + h[n]["shape"]))
        cases[f"{name}: shape +1"] = header_edit(lambda h, n=name: h[n].update(shape=[h[n]["shape"][0] + 1] +
                                                                                h[n]["shape"][1:]))
        cases[f"{name}: dtype I32"] = header_edit(lambda h, n=name: h[n].update(dtype="I32"))
        cases[f"{name}: dtype unknown"] = header_edit(lambda h, n=name: h[n].update(dtype="F8_X"))
        cases[f"{name}: offsets past the end"] = header_edit(
            lambda h, n=name: h[n].update(data_offsets=[o + 10**6 for o in h[n]["data_offsets"]]))
        cases[f"{name}: offsets as strings"] = header_edit(
            lambda h, n=name: h[n].update(data_offsets=[str(o) for o in h[n]["data_offsets"]]))
        cases[f"{name}: missing"] = header_edit(lambda h, n=name: h.pop(n))
    cases["overlapping byte ranges"] = lambda f: write_raw(
        f / "sae.safetensors", *_overlap(tensors))
    cases["extra tensor"] = lambda f: write_raw(f / "sae.safetensors", *raw_layout(
        {**tensors, "W_skip": np.zeros((D, D), np.float32)}))
    cases["header is a list"] = lambda f: write_raw(f / "sae.safetensors", [1, 2], b"")
    cases["metadata not strings"] = header_edit(lambda h: h.update(__metadata__={"a": 1}))
    cases["header length beyond file"] = lambda f: (f / "sae.safetensors").write_bytes(
        struct.pack("<Q", 10**9) + b"{}")
    cases["header nested 200,000 deep"] = lambda f: (f / "sae.safetensors").write_bytes(
        struct.pack("<Q", 400_000) + b"[" * 200_000 + b"]" * 200_000)
    cases["NaN weight"] = lambda f: write_raw(f / "sae.safetensors", *raw_layout(
        {**tensors, "b_dec": np.full(D, np.nan, np.float32)}))
    cases["F64 value beyond float32"] = lambda f: write_raw(f / "sae.safetensors", *raw_layout(
        {**{n: t.astype(np.float64) for n, t in tensors.items()}, "b_dec": np.full(D, 1e300)}))
    cfg_cases = {
        "cfg.json nested 200,000 deep": "[" * 200_000 + "]" * 200_000,
        "cfg.json empty": "",
        "cfg.json not UTF-8": b"\xff\xfe{}",
        "cfg.json a list": "[1]",
        "cfg.json without d_in": json.dumps({"k": 4}),
        "cfg.json k > M": json.dumps({"k": 10**6, "d_in": D, "expansion_factor": 4}),
        "cfg.json k negative": json.dumps({"k": -3, "d_in": D, "expansion_factor": 4}),
        "cfg.json k a string": json.dumps({"k": "4", "d_in": D, "expansion_factor": 4}),
        "cfg.json d_in 0": json.dumps({"k": 4, "d_in": 0, "expansion_factor": 4}),
        "cfg.json d_in float": json.dumps({"k": 4, "d_in": 16.5, "expansion_factor": 4}),
        "cfg.json unknown activation": json.dumps({"k": 4, "d_in": D, "expansion_factor": 4, "activation": "x"}),
        "cfg.json d_in mismatching the weights": json.dumps({"k": 4, "d_in": 8, "expansion_factor": 4}),
        "cfg.json skip_connection without W_skip": json.dumps({"k": 4, "d_in": D, "expansion_factor": 4,
                                                               "skip_connection": True}),
    }
    for name, text in cfg_cases.items():
        cases[name] = lambda f, t=text: (f / "cfg.json").write_bytes(t if isinstance(t, bytes) else t.encode())
    cases["cfg.json missing"] = lambda f: (f / "cfg.json").unlink()
    cases["sae.safetensors missing"] = lambda f: (f / "sae.safetensors").unlink()
    cases["sae.safetensors is a folder"] = lambda f: ((f / "sae.safetensors").unlink(),
                                                      (f / "sae.safetensors").mkdir())

    for name, damage in cases.items():
        folder = work / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        damage(folder)
        outcomes = {}
        for loader, load in loaders().items():
            try:
                load(folder)
                outcomes[loader] = ("loaded", "", False)
            except Exception as e:  # noqa: BLE001
                outcomes[loader] = (type(e).__name__, str(e), clear(e))
        ok = all(v[2] for v in outcomes.values())
        record("checkpoint files (all loaders)", name, ok,
               " | ".join(f"{k}: {v[0]}: {v[1]}" for k, v in outcomes.items()))


def _overlap(tensors):
    header, data = raw_layout({n: t for n, t in tensors.items() if n != "b_dec"})
    start = header["W_dec"]["data_offsets"][0]
    header["b_dec"] = {"dtype": "F32", "shape": [D], "data_offsets": [start, start + 4 * D]}
    return header, data


# ---------------------------------------------------------------------------------------------------------------
# C. Activation caches
# ---------------------------------------------------------------------------------------------------------------

def edit_manifest(folder: Path, fn) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    fn(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def rewrite_shard(path: Path, fn) -> None:
    tensors, meta = load_safetensors_numpy(path)
    fn(tensors)
    save_safetensors_numpy(path, tensors, meta)


def audit_caches(cache: Path, work: Path) -> None:
    shard0 = "shard-00000.safetensors"
    cases = {
        "absolute shard path": lambda f: edit_manifest(f, lambda m: m["shards"][0].update(file="/etc/hostname")),
        "shard path with ..": lambda f: edit_manifest(f, lambda m: m["shards"][0].update(file="../x/" + shard0)),
        "shard path with a subfolder": lambda f: edit_manifest(f, lambda m: m["shards"][0].update(file="a/b")),
        "shard is a symlink": lambda f: (os.replace(f / shard0, f.parent / "moved"),
                                         os.symlink(f.parent / "moved", f / shard0)),
        "manifest is a symlink": lambda f: (os.replace(f / MANIFEST, f.parent / "m.json"),
                                            os.symlink(f.parent / "m.json", f / MANIFEST)),
        "shard missing": lambda f: (f / shard0).unlink(),
        "shard truncated": lambda f: (f / shard0).write_bytes((f / shard0).read_bytes()[:500]),
        "shard token count mismatch": lambda f: edit_manifest(f, lambda m: (m["shards"][0].update(tokens=600),
                                                                            m.update(total_tokens=1240))),
        "total_tokens wrong": lambda f: edit_manifest(f, lambda m: m.update(total_tokens=99999)),
        "missing activation key": lambda f: rewrite_shard(f / shard0, lambda t: t.pop("layers.7.x")),
        "wrong width": lambda f: edit_manifest(
            f, lambda m: m["hookpoints"]["layers.7"].update(d_in=12)),
        "integer activations": lambda f: rewrite_shard(f / shard0, lambda t: t.update(
            {"layers.7.x": t["layers.7.x"].astype(np.int32)})),
        "manifest not JSON": lambda f: (f / MANIFEST).write_text("{"),
        "manifest nested 200,000 deep": lambda f: (f / MANIFEST).write_text("[" * 200_000 + "]" * 200_000),
        "manifest a list": lambda f: (f / MANIFEST).write_text("[]"),
        "manifest wrong format": lambda f: edit_manifest(f, lambda m: m.update(format="other")),
        "manifest shards not a list": lambda f: edit_manifest(f, lambda m: m.update(shards=5)),
        "manifest shard without file": lambda f: edit_manifest(f, lambda m: m["shards"][0].pop("file")),
        "manifest hookpoints malformed": lambda f: edit_manifest(f, lambda m: m.update(hookpoints={"h": 3})),
        "manifest missing": lambda f: (f / MANIFEST).unlink(),
    }
    for name, damage in cases.items():
        folder = work / "damaged-cache"
        shutil.rmtree(folder, ignore_errors=True)
        for extra in ("moved", "m.json"):
            (work / extra).unlink(missing_ok=True)
        shutil.copytree(cache, folder)
        damage(folder)
        try:
            ActivationCache(folder)
            record("activation caches", name, False, "accepted")
        except Exception as e:  # noqa: BLE001
            record("activation caches", name, clear(e), f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------------------------
# D. Hostile run folders (read_run_state is what train --resume and eval call first)
# ---------------------------------------------------------------------------------------------------------------

def audit_run_folders(run: Path, work: Path) -> None:
    links = [".ready", ".saving", "best", "layers.7", "state.json", "metrics.jsonl", "layers.7/sae.safetensors",
             "layers.7/state.safetensors", ".ready/layers.7", ".ready/state.json", ".saving/layers.7",
             "best/.ready", "best/.saving"]
    for link in links:
        target = work / "hostile-run"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run, target, symlinks=True)
        victim = work / "victim"
        shutil.rmtree(victim, ignore_errors=True)
        victim.mkdir()
        (victim / "precious.txt").write_text("keep")
        (victim / "state.json").write_text("{}")
        before = {p.name: p.read_bytes() for p in victim.iterdir()}
        path = target / link
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.symlink(victim / "precious.txt" if link.endswith((".json", ".jsonl", ".safetensors")) else victim,
                   path)
        try:
            read_run_state(target)
            outcome, ok = "accepted", False
        except Exception as e:  # noqa: BLE001
            outcome, ok = f"{type(e).__name__}: {e}", clear(e)
        after = {p.name: p.read_bytes() for p in victim.iterdir()}
        record("hostile run folders", f"symlink {link}", ok and after == before,
               outcome + ("" if after == before else " AND THE LINK TARGET CHANGED"))
    for name, make in {".ready holding a stray file": lambda r: ((r / ".ready").mkdir(),
                                                                  (r / ".ready" / "x.txt").write_text("x")),
                       ".saving is a file": lambda r: (r / ".saving").write_text("x"),
                       ".ready is a file": lambda r: (r / ".ready").write_text("x"),
                       "state.json nested 200,000 deep": lambda r: (r / "state.json").write_text(
                           "[" * 200_000 + "]" * 200_000),
                       "state.json not UTF-8": lambda r: (r / "state.json").write_bytes(b"\xff{}")}.items():
        target = work / "hostile-run"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run, target, symlinks=True)
        make(target)
        try:
            read_run_state(target)
            record("hostile run folders", name, False, "accepted")
        except Exception as e:  # noqa: BLE001
            record("hostile run folders", name, clear(e), f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------------------------
# E. The CLI in real processes: user mistakes, signals, two writers, failed writes
# ---------------------------------------------------------------------------------------------------------------

def audit_cli(cache: Path, run: Path, work: Path, quick: bool) -> None:
    save = work / "cli-runs"
    mistakes = {
        "--layers not in the cache": train_args(cache, save, "a", extra=["--layers", "3"]),
        "--hookpoints not in the cache": train_args(cache, save, "b", extra=["--hookpoints", "layers.9"]),
        "--activations missing folder": train_args(work / "nope", save, "c"),
        "--resume a folder without checkpoint": ["train", "--resume", work, "--quiet"],
        "--k larger than M": train_args(cache, save, "d", extra=["--k", "1000"]),
        "--batch_size 0": train_args(cache, save, "e", extra=["--batch_size", "0"]),
        "--lr negative": train_args(cache, save, "f", extra=["--lr", "-1"]),
        "--run_name with a slash": train_args(cache, save, "a/b"),
        "--resume with a changed batch size": ["train", "--resume", run, "--batch_size", "8", "--quiet"],
        "eval of a missing folder": ["eval", work / "missing"],
        "convert to an unknown format": ["convert", run / "layers.7", work / "conv", "--to", "other"],
        "constant activations": train_args(_constant_cache(work), save, "g"),
    }
    mistakes.update({
        "train: bad flag value": ["train", "--batch_size", "x"],
        "train: unknown flag": ["train", "--bogus"],
    })
    backend_free = {
        "eval of a missing folder": ["eval", work / "missing"],
        "convert to an unknown format": ["convert", run / "layers.7", work / "conv", "--to", "other"],
        "convert a missing folder": ["convert", work / "missing", work / "conv", "--to", "saelens"],
        "unknown command": ["bogus"],
    }
    for name in backend_free:
        mistakes.pop(name, None)
    if quick:
        mistakes = dict(list(mistakes.items())[:5])
    for backend in BACKENDS:
        for name, args in mistakes.items():
            args = [a if a != "torch" else backend for a in args]
            if "--backend" not in args:
                args = [args[0], "--backend", backend, *args[1:]]
            ok, detail = one_line(cli(args), 2)
            record(f"CLI user mistakes ({backend})", name, ok, detail)
    for name, args in backend_free.items():
        ok, detail = one_line(cli(args), 2)
        record("CLI user mistakes", name, ok, detail)
    # SIGTERM during a save: saves, exit 130, resumes to the end
    for backend in BACKENDS:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SAE_DEBUG_SAVE_DELAY": "2:3"}
        target = work / f"term-{backend}"
        proc = subprocess.Popen([sys.executable, "-m", "sae_core.cli",
                                 *map(str, train_args(cache, work, target.name, backend, steps=6))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_line(proc, "debug: pausing")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        state = read_run_state(target)
        resumed = cli(["train", "--backend", backend, "--resume", target, "--quiet", "--no-plots"])
        ok = proc.returncode == 130 and state and state["step"] == 2 and resumed.returncode == 0 and \
            read_run_state(target)["step"] == 6
        record("signals and processes", f"SIGTERM during training ({backend})", ok,
               f"exit {proc.returncode}, saved step {state and state['step']}, resume exit {resumed.returncode}")
    # random SIGKILLs during training, then resume
    rng = np.random.default_rng(0)
    for trial in range(2 if quick else 4):
        target = work / f"kill{trial}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "sae_core.cli",
                                 *map(str, train_args(cache, work, target.name, "torch", steps=16))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (target / "state.json").exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0, 1.0)))
        proc.kill()
        proc.communicate()
        resumed = cli(["train", "--backend", "torch", "--resume", target, "--quiet", "--no-plots"])
        state = read_run_state(target)
        record("signals and processes", f"SIGKILL at a random time, then resume (trial {trial})",
               resumed.returncode == 0 and state["step"] == 16, f"resume exit {resumed.returncode}, "
               f"final step {state['step']}")
    # two writers
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SAE_DEBUG_SAVE_DELAY": "4:60"}
    proc = subprocess.Popen([sys.executable, "-m", "sae_core.cli",
                             *map(str, train_args(cache, work, "two", "torch", steps=8))],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_line(proc, "debug: pausing")
    for name, args in {"second train with the same run name": train_args(cache, work, "two", "torch", steps=8),
                       "second process resuming it": ["train", "--resume", work / "two", "--quiet"]}.items():
        ok, detail = one_line(cli(args), 2)
        record("signals and processes", name, ok and "in use by another process" in detail, detail)
    proc.kill()
    proc.communicate()
    resumed = cli(["train", "--resume", work / "two", "--quiet", "--no-plots"])
    record("signals and processes", "resume after the lock holder was SIGKILLed", resumed.returncode == 0,
           f"exit {resumed.returncode}")
    # a failed write (file-size limit, as a full disk) during a save
    target = work / "room"
    shutil.copytree(run, target)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    result = cli(["train", "--resume", target, "--max_tokens", 512, "--quiet", "--no-plots"], preexec_fn=limit)
    ok, detail = one_line(result, 1)
    record("failed writes", "checkpoint write fails (RLIMIT_FSIZE)", ok and "intact" in detail and
           read_run_state(target)["step"] == 4, detail)


def _wait_line(proc, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"never saw {text!r}")


def audit_data_files(work: Path) -> None:
    """Text sources (read before any tokenizer runs): what is not text must be refused, not trained on."""
    from sae_core.data import load_documents

    folder = work / "data"
    folder.mkdir(exist_ok=True)
    cases = {
        "binary file named .txt": ("weights.txt", bytes(range(256)) * 64),
        "binary file named .md": ("image.md", b"\x89PNG\r\n\x1a\n" + bytes(200)),
        "Latin-1 text named .rst": ("notes.rst", "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1") * 20),
        "UTF-16 text named .txt": ("wide.txt", "hello world".encode("utf-16")),
        "JSON lines with invalid UTF-8": ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'),
        "JSON lines nested 200,000 deep": ("deep.jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n"),
        "JSON lines without the text field": ("other.jsonl", b'{"body": "x"}\n'),
        "JSON lines holding a list": ("list.jsonl", b'[1, 2]\n'),
        "JSON lines cut mid-object": ("cut.jsonl", b'{"text": "a"}\n{"text": "b\n'),
    }
    for name, (file, content) in cases.items():
        (folder / file).write_bytes(content)
        try:
            list(load_documents(str(folder / file)).texts)
            record("data files", name, False, "accepted")
        except Exception as e:  # noqa: BLE001
            record("data files", name, clear(e), f"{type(e).__name__}: {e}")
        (folder / file).unlink()
    empty = work / "empty-data"
    empty.mkdir(exist_ok=True)
    (empty / "a.bin").write_bytes(b"x")
    try:
        load_documents(str(empty))
        record("data files", "folder without text files", False, "accepted")
    except Exception as e:  # noqa: BLE001
        record("data files", "folder without text files", clear(e), f"{type(e).__name__}: {e}")


def _constant_cache(work: Path) -> Path:
    folder = work / "constant-cache"
    if not folder.exists():
        make_cache(folder, constant=True)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every case and its outcome here")
    parser.add_argument("--quick", action="store_true", help="fewer CLI cases (the slow part)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sae-fault-audit-"))
    try:
        cache = work / "cache"
        make_cache(cache)
        finished = cli(train_args(cache, work, "run", "torch", steps=4))
        if finished.returncode != 0:
            raise SystemExit(f"could not train the audit's run: {finished.stderr}")
        run = work / "run"
        print("A. SparseCoder API")
        audit_api()
        print("B. checkpoint files")
        audit_checkpoints(run, work)
        print("C. activation caches")
        audit_caches(cache, work)
        print("D. hostile run folders")
        audit_run_folders(run, work)
        print("E. data files")
        audit_data_files(work)
        print("F. CLI, signals, processes, failed writes")
        audit_cli(cache, run, work, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    categories: dict[str, list[int]] = {}
    for r in RESULTS:
        tried_ok = categories.setdefault(r["category"], [0, 0])
        tried_ok[0] += 1
        tried_ok[1] += r["ok"]
    print(f"\n{'category':<40} {'tried':>6} {'handled well':>13}")
    for category, (tried, ok) in categories.items():
        print(f"{category:<40} {tried:>6} {ok:>13}")
    total, good = len(RESULTS), sum(r["ok"] for r in RESULTS)
    print(f"{'total':<40} {total:>6} {good:>13}")
    for r in RESULTS:
        if not r["ok"]:
            print(f"not handled well: {r['category']}: {r['case']}: {r['detail']}")
    if args.json:
        args.json.write_text(json.dumps({"total": total, "handled_well": good, "cases": RESULTS}, indent=1))
    return 0 if good == total else 1


if __name__ == "__main__":
    sys.exit(main())
