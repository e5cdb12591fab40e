"""The fault suite (issue #14): bad inputs, bad files, hostile run folders, signals, two writers, full disks.

Everything is real: safetensors and JSON files on disk, `python -m sae_core.cli` in real processes, real signals
(SIGTERM, SIGKILL), real flock contention, real write failures (a read-only folder; RLIMIT_FSIZE, and a full tmpfs
where this machine lets us mount one). Where the API is shared, both backends run the same case and must raise the
same exception type with the same message. Training runs read a small activation cache written by CacheWriter, so
no language model is needed.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import start_cli, wait_for  # noqa: E402
from sae_core.activation_cache import MANIFEST, ActivationCache, CacheWriter
from sae_core.checkpoint import STALE_AFTER_S, load_checkpoint_numpy, load_safetensors_numpy, save_safetensors_numpy
from sae_core.errors import CheckpointError, UserError
from sae_core.train_config import TrainConfig
from sae_core.training_state import read_run_state

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BACKENDS = ["torch", "mlx"]
D = 16  # activation width of the test caches


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backend_param(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(not _has(name if name == "torch" else "mlx.core"),
                                                       reason=f"needs {name}"))


both_backends = pytest.mark.parametrize("backend", [backend_param(b) for b in BACKENDS])


# ---------------------------------------------------------------------------------------------------------------
# Helpers: a small cache, the CLI in a real process
# ---------------------------------------------------------------------------------------------------------------

def make_cache(folder: Path, tokens: int = 1280, hooks=("layers.7",), seed: int = 0, shard_tokens: int = 640,
               overwrite: bool = False, constant: bool = False) -> dict:
    """A real activation cache of random activations (low-rank plus noise, so a coder has something to learn)."""
    rng = np.random.default_rng(seed)
    writer = CacheWriter(folder, {h: (D, D) for h in hooks}, transcode=False, shard_tokens=shard_tokens,
                         meta={"model": "synthetic", "data_fingerprint": f"seed{seed}"}, overwrite=overwrite)
    basis = rng.standard_normal((4, D)).astype(np.float32)
    for start in range(0, tokens, 320):
        n = min(320, tokens - start)
        acts = {}
        for h in hooks:
            x = rng.standard_normal((n, 4)).astype(np.float32) @ basis + 0.1 * rng.standard_normal((n, D))
            acts[h] = (np.ones((n, D), np.float32) if constant else x.astype(np.float32), None)
        writer.add(np.arange(start, start + n), acts)
    return writer.close()


def train_args(cache: Path, save_dir: Path, run: str, backend: str, steps: int = 6, extra=()) -> list[str]:
    return ["train", "--backend", backend, "--activations", str(cache), "--save_dir", str(save_dir),
            "--run_name", run, "--batch_size", "4", "--ctx_len", "16", "--max_tokens", str(64 * steps),
            "--k", "4", "--expansion_factor", "4", "--save_every", "2", "--log_every", "1", "--quiet",
            "--no-plots", *extra]


def cli(args, *, cwd=REPO, env_extra=None, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([PYTHON, "-m", "sae_core.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line `error: ...` naming the problem, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def scalar(value) -> float:
    return float(value.detach() if hasattr(value, "detach") else value)


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "cache"
    make_cache(folder)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache) -> Path:
    """A finished 4-step torch run (checkpoints at steps 2 and 4)."""
    save_dir = tmp_path_factory.mktemp("finished")
    result = cli(train_args(cache, save_dir, "done", "torch", steps=4))
    assert result.returncode == 0, result.stderr
    return save_dir / "done"


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst, symlinks=True)
    return dst


def train_fn(backend: str):
    return importlib.import_module(f"sae_{backend}.trainer").train


def small_cfg(cache: Path, save_dir: Path, run: str, **kw) -> TrainConfig:
    from sae_core.config import SparseCoderConfig

    return TrainConfig(activations=str(cache), save_dir=str(save_dir), run_name=run, batch_size=4, ctx_len=16,
                       max_tokens=64 * 6, save_every=2, log_every=1, sae=SparseCoderConfig(k=4, expansion_factor=4),
                       **kw)


# ---------------------------------------------------------------------------------------------------------------
# 1. Security: recovery touches only what our writer made
# ---------------------------------------------------------------------------------------------------------------

HOSTILE_LINKS = [".ready", ".saving", "best", "layers.7", "state.json", "metrics.jsonl", ".ready/layers.7"]


@pytest.mark.parametrize("link", HOSTILE_LINKS)
def test_symlinks_in_a_run_folder_are_refused_and_their_targets_untouched(finished_run, tmp_path, link):
    run = copy_run(finished_run, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("do not move me")
    (victim / "state.json").write_text("{}")
    if link == ".ready/layers.7":  # a real .ready holding a link: as our writer's except for the link
        (run / ".ready").mkdir()
        os.symlink(victim, run / ".ready" / "layers.7")
    else:
        target = victim / "precious.txt" if link in ("state.json", "metrics.jsonl") else victim
        if (run / link).is_dir():
            shutil.rmtree(run / link)
        elif (run / link).exists():
            (run / link).unlink()
        os.symlink(target, run / link)
    before = tree_snapshot(victim)
    resumed = cli(["train", "--backend", "torch", "--resume", run, "--quiet", "--no-plots"])
    assert_user_error(resumed, "symbolic link", "Nothing was changed")
    evaluated = cli(["eval", run, "--backend", "torch", "--quiet"])
    assert_user_error(evaluated, "symbolic link")
    assert tree_snapshot(victim) == before
    assert os.path.islink(run / link)  # not followed, not removed: the user decides


def test_ready_with_foreign_entries_is_refused_before_anything_moves(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / ".ready").mkdir()
    (run / ".ready" / "notes.txt").write_text("not ours")
    before = tree_snapshot(run)
    with pytest.raises(CheckpointError, match="not a checkpoint entry"):
        read_run_state(run)
    assert tree_snapshot(run) == before


# ---------------------------------------------------------------------------------------------------------------
# 2. Resume on a different cache; the cache path is stored absolute
# ---------------------------------------------------------------------------------------------------------------

@both_backends
def test_resume_refuses_a_different_cache_of_the_same_size(backend, tmp_path):
    train = train_fn(backend)
    make_cache(tmp_path / "cache", seed=1)
    train(small_cfg(tmp_path / "cache", tmp_path / "runs", "r"), progress=False, plots=False, stop_after_steps=2)
    make_cache(tmp_path / "cache", seed=2, overwrite=True)  # same path, same token and shard counts
    with pytest.raises(UserError, match="activation cache differs from the one this run was trained on"):
        train(small_cfg(tmp_path / "cache", tmp_path / "runs", "r"), resume=True, progress=False, plots=False)


@both_backends
def test_resume_from_another_directory_and_with_the_absolute_cache_path(backend, tmp_path, monkeypatch):
    train = train_fn(backend)
    (tmp_path / "work").mkdir()
    make_cache(tmp_path / "work" / "cache")
    monkeypatch.chdir(tmp_path / "work")
    first = train(small_cfg(Path("cache"), tmp_path / "runs", "r"), progress=False, plots=False, stop_after_steps=2)
    run = Path(first["run_dir"])
    assert read_run_state(run)["train_config"]["activations"] == str(tmp_path / "work" / "cache")
    monkeypatch.chdir(tmp_path)  # elsewhere: the stored path still finds the cache
    middle = train(TrainConfig(), resume=str(run), explicit=set(), progress=False, plots=False, stop_after_steps=4)
    assert middle["step"] == 4
    absolute = small_cfg(tmp_path / "work" / "cache", tmp_path / "runs", "r")
    done = train(absolute, resume=str(run), explicit={"activations"}, progress=False, plots=False)
    assert done["step"] == 6 and not done["interrupted"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Input validation at the SparseCoder API: the same exception and message in both backends
# ---------------------------------------------------------------------------------------------------------------

M = 32
BAD_CALLS = {
    # name: (method, args builder(xp), expected type, message fragment)
    "numpy input": ("forward", lambda a: (a.numpy_x(),), TypeError, "got numpy.ndarray"),
    "list input": ("forward", lambda a: (a.numpy_x().tolist(),), TypeError, "got list"),
    "1-D input": ("forward", lambda a: (a.x()[0],), ValueError, "got shape (16,)"),
    "3-D input": ("forward", lambda a: (a.x()[None],), ValueError, "flatten the leading dimensions"),
    "wrong width": ("forward", lambda a: (a.x()[:, :15],), ValueError, "d_in=16"),
    "y wrong rows": ("forward", lambda a: (a.x(), a.x()[:3]), ValueError, "y must have shape [N=6, d_out=16]"),
    "float64 input": ("forward", lambda a: (a.x("float64"),), TypeError, "got float64"),
    "int input": ("forward", lambda a: (a.x("int32"),), TypeError, "got int32"),
    "0 tokens": ("forward", lambda a: (a.x()[:0],), ValueError, "no rows"),
    "1 token": ("forward", lambda a: (a.x()[:1],), ValueError, "total variance is 0.0 (a single token)"),
    "constant batch": ("forward", lambda a: (a.const(),), ValueError, "all 6 rows of the targets are identical"),
    "NaN targets": ("forward", lambda a: (a.x(), a.nan_y()), ValueError, "NaN or Inf"),
    "dead_mask longer than M": ("forward", lambda a: (a.x(), None, a.mask(M + 1)), ValueError, "[M=32]"),
    "dead_mask shorter than M": ("forward", lambda a: (a.x(), None, a.mask(M - 1)), ValueError, "[M=32]"),
    "dead_mask 2-D": ("forward", lambda a: (a.x(), None, a.mask(M)[None]), ValueError, "[M=32]"),
    "dead_mask int": ("forward", lambda a: (a.x(), None, a.mask(M, "int32")), TypeError, "dtype bool"),
    "dead_mask numpy": ("forward", lambda a: (a.x(), None, np.ones(M, bool)), TypeError, "got numpy.ndarray"),
    "encode wrong width": ("encode", lambda a: (a.x()[:, :8],), ValueError, "d_in=16"),
    "encode numpy": ("encode", lambda a: (a.numpy_x(),), TypeError, "got numpy.ndarray"),
    "decode index = M": ("decode", lambda a: (a.acts(), a.idx(M)), ValueError, "got values from 0 to 32"),
    "decode index < 0": ("decode", lambda a: (a.acts(), a.idx(-1)), ValueError, "got values from -1 to"),
    "decode float indices": ("decode", lambda a: (a.acts(), a.idx(3, "float32")), TypeError, "integer dtype"),
    "decode shape mismatch": ("decode", lambda a: (a.acts(), a.idx(3)[:, :2]), ValueError, "shape of top_acts"),
    "decode 1-D": ("decode", lambda a: (a.acts()[0], a.idx(3)[0]), ValueError, "[N, k]"),
}


class Args:
    """Builds the same NumPy data as each backend's arrays."""

    def __init__(self, backend: str):
        self.backend = backend
        self.rng = np.random.default_rng(0)
        self.data = self.rng.standard_normal((6, D)).astype(np.float32)

    def arr(self, value: np.ndarray, dtype: str):
        if self.backend == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(value)).to(getattr(torch, dtype))
        import mlx.core as mx

        return mx.array(value).astype(getattr(mx, "bool_" if dtype == "bool" else dtype))

    def numpy_x(self):
        return self.data

    def x(self, dtype="float32"):
        return self.arr(self.data, dtype)

    def const(self):
        return self.arr(np.ones((6, D), np.float32), "float32")

    def nan_y(self):
        y = self.data.copy()
        y[2, 3] = np.nan
        return self.arr(y, "float32")

    def mask(self, n, dtype="bool"):
        return self.arr(np.arange(n) % 3 == 0, dtype)

    def acts(self):
        return self.arr(np.ones((2, 3), np.float32), "float32")

    def idx(self, top, dtype="int32"):
        return self.arr(np.array([[0, 1, top], [2, 3, 4]]), dtype)


def _coder(backend: str):
    from sae_core.config import SparseCoderConfig

    cfg = SparseCoderConfig(k=4, num_latents=M)
    if backend == "torch":
        import torch
        from sae_torch.sparse_coder import SparseCoder

        torch.manual_seed(0)
        return SparseCoder(D, cfg)
    from sae_mlx.sparse_coder import SparseCoder

    return SparseCoder(D, cfg)


def _call(backend: str, case: str):
    method, build, _, _ = BAD_CALLS[case]
    coder, args = _coder(backend), build(Args(backend))
    if method == "forward":
        x, y, mask = (list(args) + [None, None])[:3]
        return coder(x, y, dead_mask=mask)
    return getattr(coder, method)(*args)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_the_same_error_in_both_backends(case):
    for module in ("torch", "mlx.core"):
        if not _has(module):
            pytest.skip(f"needs {module}")
    _, _, kind, fragment = BAD_CALLS[case]
    errors = {}
    for backend in BACKENDS:
        with pytest.raises(kind) as info:
            _call(backend, case)
        assert isinstance(info.value, UserError)  # the trainer and the CLI report it in one line
        assert fragment in str(info.value), str(info.value)
        errors[backend] = (type(info.value), str(info.value))
    assert errors["torch"] == errors["mlx"]


@both_backends
def test_good_calls_still_work(backend):
    """The checks refuse only bad calls: a normal forward, encode/decode round trip and dead_mask pass."""
    a, coder = Args(backend), _coder(backend)
    out = coder(a.x(), dead_mask=a.mask(M))
    assert scalar(out.fvu) > 0 and scalar(out.auxk_loss) >= 0
    enc = coder.encode(a.x())
    assert tuple(coder.decode(enc.top_acts, enc.top_indices).shape) == (6, D)


# ---------------------------------------------------------------------------------------------------------------
# 4. Two processes in one run folder
# ---------------------------------------------------------------------------------------------------------------

@both_backends
def test_a_second_writer_is_refused_and_a_killed_one_does_not_block(backend, cache, tmp_path):
    args = train_args(cache, tmp_path, "shared", backend, steps=8)
    first = start_cli(args, {"SAE_DEBUG_SAVE_DELAY": "4:120"})  # holds the folder, paused in step 4's save
    try:
        wait_for(first, "debug: pausing")
        second = cli(args)  # the same run name: a new run in a folder in use
        assert_user_error(second, "in use by another process")
        resumer = cli(["train", "--backend", backend, "--resume", tmp_path / "shared", "--quiet", "--no-plots"])
        assert_user_error(resumer, "in use by another process")
        assert read_run_state(tmp_path / "shared")["step"] == 2  # the reader saw the first checkpoint, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = cli(["train", "--backend", backend, "--resume", tmp_path / "shared", "--quiet", "--no-plots"])
    assert resumed.returncode == 0, resumed.stderr  # the kernel dropped the dead process's lock
    assert read_run_state(tmp_path / "shared")["step"] == 8
    steps = [json.loads(line)["step"] for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # logged once each


def test_eval_reads_while_a_writer_holds_the_folder(cache, tmp_path):
    """A reader takes no lock and leaves the writer's staging folder alone."""
    args = train_args(cache, tmp_path, "busy", "torch", steps=8)
    first = start_cli(args, {"SAE_DEBUG_SAVE_DELAY": "4:120"})
    try:
        wait_for(first, "debug: pausing")
        assert (tmp_path / "busy" / ".saving").is_dir()
        state = read_run_state(tmp_path / "busy")  # what `sae eval` calls first
        assert state["step"] == 2
        assert (tmp_path / "busy" / ".saving").is_dir()  # not "recovered" under the writer's feet
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# ---------------------------------------------------------------------------------------------------------------
# 5. SIGTERM, harvest --overwrite, stale partial folders
# ---------------------------------------------------------------------------------------------------------------

@both_backends
def test_sigterm_saves_and_exits_like_ctrl_c(backend, cache, tmp_path):
    args = train_args(cache, tmp_path, "term", backend, steps=8)
    proc = start_cli(args, {"SAE_DEBUG_SAVE_DELAY": "4:3"})
    wait_for(proc, "debug: pausing")
    proc.send_signal(signal.SIGTERM)  # as a job scheduler stops a job
    proc.wait(timeout=120)  # stderr belongs to the reader thread (communicate() would race it for the lines)
    out = proc.stdout.read()
    proc.reader.join(timeout=10)
    stderr = "".join(proc.lines)
    assert proc.returncode == 130, stderr
    assert "Received SIGTERM" in stderr and "Traceback" not in stderr
    assert "Resume with" in out
    assert read_run_state(tmp_path / "term")["step"] == 4
    resumed = cli(["train", "--backend", backend, "--resume", tmp_path / "term", "--quiet", "--no-plots"])
    assert resumed.returncode == 0, resumed.stderr
    assert read_run_state(tmp_path / "term")["step"] == 8


HARVEST_THEN_HANG = """
import signal, sys, time, numpy as np
from sae_core.activation_cache import CacheWriter
# what a terminal's Ctrl-C meets; a background launcher (a shell's `cmd &`) may have handed us SIGINT ignored,
# and then the SIGINT below would never arrive (seen once in a CI run started that way)
signal.signal(signal.SIGINT, signal.default_int_handler)
writer = CacheWriter(sys.argv[1], {"layers.7": (16, 16)}, False, shard_tokens=100, overwrite=True)
for i in range(5):
    writer.add(np.arange(100), {"layers.7": (np.full((100, 16), 7.0, np.float32), None)})
print("shards written", flush=True)
time.sleep(600)
"""


def test_an_interrupted_harvest_overwrite_keeps_the_old_cache(cache, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    old = ActivationCache(folder).fingerprint
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen([PYTHON, "-c", HARVEST_THEN_HANG, str(folder)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == "shards written"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert ActivationCache(folder).fingerprint == old  # untouched: the new one was built beside it
    partials = sorted(tmp_path.glob(".cache.*.partial"))
    assert partials  # the SIGKILLed harvest's, and the interrupted one's (removed on exit only by the next run)
    for p in partials:  # age them past the grace period that protects a folder being created right now
        os.utime(p, (time.time() - STALE_AFTER_S - 1,) * 2)
    make_cache(folder, seed=5, overwrite=True)  # a complete harvest swaps in and sweeps the stale partials
    assert ActivationCache(folder).fingerprint != old
    assert not list(tmp_path.glob(".cache.*"))


HOLD_STAGING = """
import sys, time
from pathlib import Path
from sae_core.checkpoint import make_staging_dir
staging = make_staging_dir(Path(sys.argv[1]), "partial")
(staging / "big.bin").write_bytes(b"x" * 1000)
print(staging, flush=True)
time.sleep(600)
"""


def test_a_sigkilled_convert_leaves_nothing_behind_for_long(finished_run, tmp_path):
    """`sae convert` stages into the same kind of folder; the next convert removes stale ones (ours only)."""
    dst = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dead = subprocess.Popen([PYTHON, "-c", HOLD_STAGING, str(dst)], stdout=subprocess.PIPE, text=True, env=env)
    dead_partial = Path(dead.stdout.readline().strip())
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    alive = subprocess.Popen([PYTHON, "-c", HOLD_STAGING, str(dst)], stdout=subprocess.PIPE, text=True, env=env)
    alive_partial = Path(alive.stdout.readline().strip())
    decoy_target = tmp_path / "decoy"
    decoy_target.mkdir()
    (decoy_target / "keep.txt").write_text("keep")
    decoy = tmp_path / ".converted.abcdefgh.partial"  # our name pattern, but a link: never followed or removed
    os.symlink(decoy_target, decoy)
    try:
        for p in (dead_partial, alive_partial):
            os.utime(p, (time.time() - STALE_AFTER_S - 1,) * 2)
        result = cli(["convert", finished_run / "layers.7", dst, "--to", "saelens"])
        assert result.returncode == 0, result.stderr
        assert not dead_partial.exists()  # its writer is dead: removed
        assert alive_partial.exists()  # its writer is alive (holds the lock): kept
        assert decoy.is_symlink() and (decoy_target / "keep.txt").read_text() == "keep"
        assert (dst / "sae_weights.safetensors").is_file()
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------------------------------------------
# 6. Bad data
# ---------------------------------------------------------------------------------------------------------------

def test_binary_file_named_txt_is_refused(tmp_path):
    from sae_core.data import load_documents

    (tmp_path / "model.txt").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(UserError, match="not a text file: it holds NUL bytes"):
        list(load_documents(str(tmp_path / "model.txt")).texts)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 10)
    with pytest.raises(UserError, match="not a text file: it is not UTF-8"):
        list(load_documents(str(tmp_path / "latin1.txt")).texts)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not UTF-8"):
        list(load_documents(str(tmp_path / "bad.jsonl")).texts)


@both_backends
def test_layers_or_hookpoints_missing_from_the_cache_are_refused(backend, cache, tmp_path):
    result = cli(train_args(cache, tmp_path, "l3", backend, extra=["--layers", "3"]))
    assert_user_error(result, "holds no hookpoint for layer(s) 3", "it has layers.7")
    result = cli(train_args(cache, tmp_path, "h9", backend, extra=["--hookpoints", "layers.9"]))
    assert_user_error(result, "no hookpoint matching 'layers.9'")
    assert not (tmp_path / "l3" / "state.json").exists() and not (tmp_path / "h9" / "state.json").exists()
    ok = cli(train_args(cache, tmp_path, "l7", backend, steps=2, extra=["--layers", "7"]))
    assert ok.returncode == 0, ok.stderr
    assert list(read_run_state(tmp_path / "l7")["coders"]) == ["layers.7"]


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _rewrite_shard(path: Path, edit) -> None:
    tensors, meta = load_safetensors_numpy(path)
    edit(tensors)
    save_safetensors_numpy(path, tensors, meta)


BAD_CACHES = {
    "absolute shard path": (lambda f: _edit_manifest(f, lambda m: m["shards"][0].update(file="/etc/hostname")),
                            "not a plain file name"),
    "shard outside via ..": (lambda f: _edit_manifest(f, lambda m: m["shards"][0].update(file="../cache2/x")),
                             "not a plain file name"),
    "shard is a symlink": (lambda f: (os.replace(f / "shard-00000.safetensors", f.parent / "elsewhere"),
                                      os.symlink(f.parent / "elsewhere", f / "shard-00000.safetensors")),
                           "symbolic link"),
    "token count mismatch": (lambda f: _edit_manifest(f, lambda m: (m["shards"][0].update(tokens=600),
                                                                    m.update(total_tokens=1240))),
                             "does not match manifest.json"),
    "total does not add up": (lambda f: _edit_manifest(f, lambda m: m.update(total_tokens=5000)),
                              "not the sum of the shards' tokens"),
    "missing key": (lambda f: _rewrite_shard(f / "shard-00001.safetensors", lambda t: t.pop("layers.7.x")),
                    "no tensor 'layers.7.x'"),
    "wrong width": (lambda f: _edit_manifest(f, lambda m: m["hookpoints"]["layers.7"].update(d_in=12, d_out=12)),
                    "'layers.7.x' has shape [640, 16], the manifest implies [640, 12]"),
    "integer activations": (lambda f: _rewrite_shard(f / "shard-00000.safetensors",
                                                     lambda t: t.update({"layers.7.x": t["layers.7.x"].astype(
                                                         np.int32)})),
                            "expected a float type"),
    "manifest not an object": (lambda f: (f / MANIFEST).write_text("[1, 2]"), "not an activation cache manifest"),
    "malformed manifest": (lambda f: _edit_manifest(f, lambda m: m.update(shards=[{"tokens": 3}])),
                           "malformed manifest"),
    "manifest nested 200,000 deep": (lambda f: (f / MANIFEST).write_text("[" * 200_000 + "]" * 200_000),
                                     "invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_damaged_or_hostile_caches_are_refused_before_training(cache, tmp_path, case):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    damage, fragment = BAD_CACHES[case]
    damage(folder)
    with pytest.raises(UserError, match=None) as info:
        ActivationCache(folder)
    assert fragment in str(info.value)


@both_backends
def test_a_damaged_cache_is_one_line_in_the_cli(backend, cache, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    _rewrite_shard(folder / "shard-00001.safetensors", lambda t: t.pop("layers.7.x"))
    assert_user_error(cli(train_args(folder, tmp_path, "x", backend)), "no tensor 'layers.7.x'")


# ---------------------------------------------------------------------------------------------------------------
# 7. Non-finite values
# ---------------------------------------------------------------------------------------------------------------

def test_nan_in_the_training_state_is_refused_on_resume(cache, tmp_path):
    save_dir = tmp_path / "runs"
    assert cli(train_args(cache, save_dir, "nan", "torch", steps=8, extra=["--max_tokens", "128"])).returncode == 0
    path = save_dir / "nan" / "layers.7" / "state.safetensors"
    tensors, meta = load_safetensors_numpy(path)
    name = next(n for n in tensors if n.startswith("optimizer."))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = np.nan
    save_safetensors_numpy(path, tensors, meta)
    for backend in [b for b in BACKENDS if _has(b if b == "torch" else "mlx.core")]:
        result = cli(["train", "--backend", backend, "--resume", save_dir / "nan", "--max_tokens", "256",
                      "--quiet", "--no-plots"])
        assert_user_error(result, name, "NaN or Inf")


@both_backends
def test_resuming_a_finished_run_reports_its_saved_metrics(backend, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    result = cli(["train", "--backend", backend, "--resume", run, "--quiet", "--no-plots"])
    assert result.returncode == 0, result.stderr
    assert "already finished (4 of 4 steps" in result.stdout
    assert "nan" not in result.stdout.lower()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"FVU {last['fvu/layers.7']:.4f}" in result.stdout


@both_backends
def test_a_constant_batch_stops_training_with_a_clear_message(backend, tmp_path):
    make_cache(tmp_path / "cache", constant=True)
    result = cli(train_args(tmp_path / "cache", tmp_path / "runs", "c", backend))
    assert_user_error(result, "total variance is 0.0", "identical")


# ---------------------------------------------------------------------------------------------------------------
# 8. Bad checkpoint files and failed writes
# ---------------------------------------------------------------------------------------------------------------

def _load_both(folder: Path):
    """Load a checkpoint folder with every available loader; returns {loader: result or exception}."""
    out = {}
    loaders = {"numpy": lambda: load_checkpoint_numpy(folder)}
    if _has("torch"):
        from sae_torch.sparse_coder import SparseCoder as TorchCoder

        loaders["torch"] = lambda: TorchCoder.load_from_disk(folder)
    if _has("mlx.core"):
        from sae_mlx.sparse_coder import SparseCoder as MlxCoder

        loaders["mlx"] = lambda: MlxCoder.load_from_disk(folder)
    for name, load in loaders.items():
        try:
            out[name] = load()
        except Exception as e:  # noqa: BLE001 -- the point: which exception each loader raises
            out[name] = e
    return out


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    return load_safetensors_numpy(folder / "sae.safetensors")[0]


def _raw_layout(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    header, chunks, offset = {}, [], 0
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtypes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def _corrupt(kind: str, folder: Path) -> None:
    tensors = _tensors(folder)
    path = folder / "sae.safetensors"
    if kind == "cfg.json nested 200,000 deep":
        (folder / "cfg.json").write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "trailing bytes":
        path.write_bytes(path.read_bytes() + b"\0" * 64)
    elif kind == "float shapes":
        header, data = _raw_layout(tensors)
        header["b_dec"]["shape"] = [float(n) for n in header["b_dec"]["shape"]]
        _write_raw_safetensors(path, header, data)
    elif kind == "overlapping byte ranges":  # b_dec's bytes are the first row of W_dec's: no gap, no tail
        header, data = _raw_layout({n: t for n, t in tensors.items() if n != "b_dec"})
        start = header["W_dec"]["data_offsets"][0]
        header["b_dec"] = {"dtype": "F32", "shape": [D], "data_offsets": [start, start + 4 * D]}
        _write_raw_safetensors(path, header, data)
    elif kind == "header not JSON":
        path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    elif kind == "F64 value beyond float32":
        tensors = {n: t.astype(np.float64) for n, t in tensors.items()}
        tensors["b_dec"][0] = 1e300
        _write_raw_safetensors(path, *_raw_layout(tensors))


BAD_FILES = {
    "cfg.json nested 200,000 deep": "invalid JSON",
    "trailing bytes": "trailing bytes",
    "float shapes": "malformed header entry",
    "overlapping byte ranges": "overlaps the previous tensor",
    "header not JSON": "not a safetensors file",
    "F64 value beyond float32": "NaN or Inf",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_checkpoint_files_give_a_clear_checkpoint_error_in_every_loader(finished_run, tmp_path, kind):
    folder = tmp_path / "layers.7"
    shutil.copytree(finished_run / "layers.7", folder)
    _corrupt(kind, folder)
    results = _load_both(folder)
    for loader, result in results.items():
        assert isinstance(result, CheckpointError), (loader, repr(result))
        assert BAD_FILES[kind] in str(result), (loader, str(result))


def test_overlapping_tensors_are_refused_by_convert(finished_run, tmp_path):
    folder = tmp_path / "layers.7"
    shutil.copytree(finished_run / "layers.7", folder)
    _corrupt("overlapping byte ranges", folder)
    assert_user_error(cli(["convert", folder, tmp_path / "out", "--to", "saelens"]), "overlaps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["F64", "F16 weights with F32 biases"])
def test_f64_and_mixed_dtype_checkpoints_load_as_one_dtype(finished_run, tmp_path, layout):
    folder = tmp_path / "layers.7"
    shutil.copytree(finished_run / "layers.7", folder)
    tensors = _tensors(folder)
    if layout == "F64":
        cast = {n: t.astype(np.float64) for n, t in tensors.items()}
    else:
        cast = {n: t.astype(np.float16) if t.ndim == 2 else t for n, t in tensors.items()}
    _write_raw_safetensors(folder / "sae.safetensors", *_raw_layout(cast))
    x = np.random.default_rng(0).standard_normal((6, D)).astype(np.float32)
    for loader, coder in _load_both(folder).items():
        assert not isinstance(coder, Exception), (loader, repr(coder))
        if loader == "numpy":
            continue
        assert "float32" in str(coder.dtype)
        arr = Args(loader).arr(x, "float32")
        fvu = scalar(coder(arr).fvu)
        assert np.isfinite(fvu), loader


@both_backends
def test_deep_json_everywhere_is_a_clear_error(backend, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "state.json").write_text("{\"a\":" * 200_000 + "1" + "}" * 200_000)
    assert_user_error(cli(["train", "--backend", backend, "--resume", run, "--quiet"]), "state.json", "invalid JSON")
    (tmp_path / "x.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    from sae_core.data import load_documents

    with pytest.raises(UserError, match="x.jsonl:1: not a JSON object"):
        list(load_documents(str(tmp_path / "x.jsonl")).texts)


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for the process under test: chmod for a normal user (root ignores modes), a
    read-only bind mount for root where mounting is allowed."""
    mounted = []

    def make(folder: Path) -> None:
        if os.geteuid() != 0:
            for p in [folder, *folder.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            return
        if not _can_mount() or subprocess.run(["mount", "--bind", folder, folder]).returncode != 0:
            pytest.skip("root here, and no read-only bind mount allowed: chmod would not stop root's writes")
        mounted.append(folder)
        if subprocess.run(["mount", "-o", "remount,bind,ro", folder, folder]).returncode != 0:
            pytest.skip("cannot remount read-only here")

    yield make
    for folder in mounted:
        subprocess.run(["umount", folder])
    for p in tmp_path.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def test_a_read_only_run_folder_is_one_line_and_the_checkpoint_intact(finished_run, tmp_path, read_only):
    run = copy_run(finished_run, tmp_path)
    before = tree_snapshot(run)
    read_only(run)
    result = cli(["train", "--backend", "torch", "--resume", run, "--max_tokens", "512", "--quiet", "--no-plots"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Read-only file system" in lines[0] or "Permission denied" in lines[0], lines[0]
    assert tree_snapshot(run) == before


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then an oversized write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@both_backends
def test_a_write_that_runs_out_of_room_keeps_the_last_checkpoint(backend, finished_run, tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the checkpoint's large writes (EFBIG), as a full disk would (ENOSPC)."""
    run = copy_run(finished_run, tmp_path)
    before = tree_snapshot(run)
    result = cli(["train", "--backend", backend, "--resume", run, "--max_tokens", "512", "--quiet", "--no-plots"],
                 preexec_fn=_limit_file_size)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and "could not write the checkpoint" in lines[0] and "is intact" in lines[0], lines
    def checkpoint(snapshot):  # the metrics log is not the checkpoint (a resume rewrites it)
        return {k: v for k, v in snapshot.items() if not k.startswith(".saving") and k != "metrics.jsonl"}

    assert checkpoint(tree_snapshot(run)) == checkpoint(before)
    assert read_run_state(run)["step"] == 4  # and the next resume discards the abandoned write
    assert not (run / ".saving").exists()


@pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root")
def test_a_full_disk_keeps_the_last_checkpoint(finished_run, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", disk]).returncode != 0:
        pytest.skip("tmpfs mount refused here")
    try:
        run = copy_run(finished_run, disk)
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave less room than one more checkpoint needs
            free = shutil.disk_usage(disk).free
            f.write(b"\0" * max(free - 20_000, 0))
        before = read_run_state(run)["step"]
        result = cli(["train", "--backend", "torch", "--resume", run, "--max_tokens", "512", "--quiet",
                      "--no-plots"])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and "No space left on device" in lines[0] and "is intact" in lines[0], lines
        filler.unlink()
        assert read_run_state(run)["step"] == before
        _load_both(run / "layers.7")
    finally:
        subprocess.run(["umount", disk])


@pytest.mark.parametrize("args", [["train", "--batch_size", "x"], ["train", "--bogus"], ["bogus"],
                                  ["convert", "a", "b", "--to", "other"]])
def test_bad_flags_are_one_line_too(args):
    assert_user_error(cli(args), "(see sae")
