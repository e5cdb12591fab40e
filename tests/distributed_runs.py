"""Helpers shared by tests/test_distributed_torch.py and tests/test_distributed_mlx.py: the data (tiny coders
trained from arrays made in NumPy from a seed), the worker each test file runs as a script, and the launching of
real processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROWS, D_IN, BATCHES = 96, 24, 8


def make_batches(hooks, seed: int = 0, rows=ROWS, batches=BATCHES):
    """Global batches {hook: [rows, D_IN]} with a per-hook offset (b_dec != 0) and a few strong directions."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, D_IN)).astype(np.float32)
    out = []
    for _ in range(batches):
        batch = {}
        for i, hook in enumerate(hooks):
            codes = rng.exponential(size=(rows, 16)).astype(np.float32) * (rng.random((rows, 16)) < 0.2)
            batch[hook] = codes @ basis + 0.5 * (i + 1) + 0.05 * rng.normal(size=(rows, D_IN)).astype(np.float32)
        out.append(batch)
    return out


def worker(opts: dict, distributed, default_hooks) -> None:
    """One rank: train as `opts` says with `distributed.train` (sae_torch's or sae_mlx's), print its result."""
    from sae_core.config import SparseCoderConfig
    from sae_core.train_config import TrainConfig

    hooks = opts.get("hooks", list(default_hooks[:1]))
    batches = make_batches(hooks, batches=opts.get("batches", BATCHES))
    cfg = TrainConfig(sae=SparseCoderConfig(k=4, expansion_factor=4, multi_topk=opts.get("multi_topk", False)),
                      optimizer=opts.get("optimizer", "adam"), lr=opts.get("lr", 3e-3), lr_warmup_steps=0,
                      max_tokens=ROWS * opts.get("steps", BATCHES), grad_acc_steps=opts.get("grad_acc", 1),
                      micro_acc_steps=opts.get("micro_acc", 1), dead_feature_threshold=200,
                      save_dir=opts["save_dir"], run_name=opts["run_name"], save_every=opts.get("save_every", 1000),
                      log_every=2, distribute_modules=opts.get("distribute_modules", False))
    result = distributed.train(cfg, batches, resume=opts.get("resume", False), progress=False,
                               stop_after_steps=opts.get("stop_after"), plots=False)
    print("RESULT " + json.dumps({k: result[k] for k in ("step", "tokens", "coders")} |
                                 {"rank": result.get("rank", 0)}), flush=True)


def write_cache(folder: Path, hooks, tokens: int = 4 * ROWS) -> Path:
    """A small activation cache (sae_core.activation_cache) of the arrays above, in 4 shards."""
    from sae_core.activation_cache import CacheWriter

    writer = CacheWriter(folder, {h: (D_IN, D_IN) for h in hooks}, False, shard_tokens=tokens // 4)
    for i, batch in enumerate(make_batches(hooks, batches=tokens // ROWS)):
        writer.add(np.arange(ROWS) + i * ROWS, {h: (x, x) for h, x in batch.items()})
    writer.close()
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script: str, opts: dict, world: int, rank_env: Callable[[int], dict],
          extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Start `world` processes of `script worker opts`, rank r with the environment rank_env(r) adds (world 1:
    nothing added, no process group at all)."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(extra_env or {})}
        if world > 1:
            env.update(rank_env(rank))
        procs.append(subprocess.Popen([sys.executable, script, "worker", json.dumps(opts)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    deadline = time.monotonic() + timeout
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"distributed run did not finish in {timeout} s (a hang)")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def results(done) -> list[dict]:
    out = []
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
        line = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")][-1]
        out.append(json.loads(line[len("RESULT "):]))
    return out


def tensors(run: Path, name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {**load_file(str(run / name / "sae.safetensors")), **load_file(str(run / name / "state.safetensors"))}


def max_rel_diff(a: dict, b: dict, keys=("encoder.weight", "encoder.bias", "W_dec", "b_dec")) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in keys)
