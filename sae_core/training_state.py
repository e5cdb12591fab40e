"""The run folder and the training-state layout, defined once for both backends (safetensors + JSON, no pickle).

It owns the run folder (coder folders, state.json, best/), the per-coder state.safetensors (firing counters,
optimizer slots and scalars), atomic checkpoints through .saving/ and .ready/, recovery of an interrupted save,
refusal of symbolic links in untrusted run folders, and the one-writer lock. Every key, the version history and
the save protocol are in docs/SPEC.md, section 4.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checkpoint import load_safetensors_numpy, read_json, save_safetensors_numpy, write_text_atomic
from .errors import CheckpointError, UserError
from .train_config import TrainConfig, incompatible_changes

FORMAT = "sae-twins/train-state"
VERSION = 2  # 2: signum became schedule-free (state z, y and scalars instead of momentum)
STATE_FILE = "state.json"
CODER_STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
PLOTS_DIR = "plots"
SAVING = ".saving"
READY = ".ready"
RESERVED = {STATE_FILE, METRICS_FILE, BEST_DIR, PLOTS_DIR, SAVING, READY}

OPTIMIZER_SLOTS = {"signum": ("z", "y"), "adam": ("exp_avg", "exp_avg_sq")}
OPTIMIZER_SCALARS = {"signum": ("k", "lr_max", "weight_sum"), "adam": ()}
TRAIN_POINT_SLOT = "y"  # schedule-free's train point: a copy of the parameters, not a separate buffer in memory
PARAM_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip")


def optimizer_tensor_name(param: str, slot: str) -> str:
    return f"optimizer.{param}.{slot}"


def optimizer_scalar_name(scalar: str) -> str:
    return f"optimizer.{scalar}"


def coder_names(hookpoints: list[str], init_seeds: list[int]) -> dict[str, tuple[str, int]]:
    """{coder name: (hookpoint, seed)}: the hookpoint itself, or `<hookpoint>/seed<n>` with several seeds."""
    names = {}
    for hook in hookpoints:
        if hook.split(".")[0] in RESERVED or hook in RESERVED:
            raise UserError(f"hookpoint name {hook!r} clashes with a file of the run folder")
        for seed in init_seeds:
            names[f"{hook}/seed{seed}" if len(init_seeds) > 1 else hook] = (hook, seed)
    return names


# ---------------------------------------------------------------------------------------------------------------
# Atomic publish / recovery
# ---------------------------------------------------------------------------------------------------------------

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _untrusted(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; this library never writes that, so the run folder was altered or "
                           f"comes from an untrusted source. Nothing was changed: inspect it and remove the entry")


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _check_no_links(folder: Path) -> None:
    """Refuse a symbolic link anywhere under `folder` (not followed: os.walk does not enter linked folders)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if (Path(root) / name).is_symlink():
                raise _untrusted(Path(root) / name, "is a symbolic link")


def _check_ready(ready: Path) -> None:
    """`.ready/` must look exactly like what `commit_save` renames into place: a real folder holding state.json and
    coder folders, with no links anywhere below it."""
    if not _is_real_dir(ready):
        raise _untrusted(ready, "is a symbolic link or not a folder")
    for item in ready.iterdir():
        if item.is_symlink():
            raise _untrusted(item, "is a symbolic link")
        if item.name == STATE_FILE and item.is_file():
            continue
        if not item.is_dir() or item.name.startswith(".") or item.name in RESERVED:
            raise _untrusted(item, "is not a checkpoint entry (state.json or a coder folder)")
    _check_no_links(ready)


def _roll_forward(target: Path) -> None:
    ready = target / READY
    for item in sorted(ready.iterdir()):
        dest = target / item.name
        _remove(dest)
        os.replace(item, dest)
        debug_pause("publish")
    ready.rmdir()


def needs_recovery(target: Path) -> bool:
    target = Path(target)
    return any(os.path.lexists(p) for p in (target / SAVING, target / READY, target / BEST_DIR / SAVING,
                                             target / BEST_DIR / READY))


def recover(target: Path) -> list[str]:
    """Finish or discard an interrupted save in `target` (a run folder or its best/); returns what was done.

    Checks everything first (see docs/SPEC.md section 4: untrusted run folders), then acts."""
    done = []
    target = Path(target)
    saving, ready, best = target / SAVING, target / READY, target / BEST_DIR
    if os.path.lexists(saving) and not _is_real_dir(saving):
        raise _untrusted(saving, "is a symbolic link or not a folder")
    if os.path.lexists(ready):
        _check_ready(ready)
    if best.is_symlink():
        raise _untrusted(best, "is a symbolic link")
    if os.path.lexists(saving):
        shutil.rmtree(saving)  # never follows links inside
        done.append(f"discarded an incomplete checkpoint write in {saving}")
    if os.path.lexists(ready):
        _roll_forward(target)
        done.append(f"finished installing the checkpoint left in {ready}")
    if best.is_dir():
        done += recover(best)
    return done


# ---------------------------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------------------------

_HELD_LOCKS: dict[str, int] = {}  # realpath of a run folder -> the fd holding its flock, in this process


def _distributed_rank() -> int:
    """This process's rank in a torchrun or mlx.launch job (0 when not distributed)."""
    for name in ("RANK", "MLX_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _open_lock(run: Path) -> int:
    """A descriptor of the run folder itself, to flock (works on a read-only file system too)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        raise UserError("training needs file locks (fcntl) to keep two processes out of one run folder; this "
                        "platform (Windows) has none: use Linux or macOS") from None
    return os.open(run, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_run(run: Path) -> None:
    """Make this process the only writer of run folder `run` until `unlock_run` or its exit.

    Raises UserError when another live process holds it. The kernel drops the lock when the holder dies, so a
    killed run never blocks its resumption. Idempotent within a process; a no-op on ranks other than 0 and for a
    folder that does not exist (nothing to protect; `choose_run_dir` creates the folder of a new run first)."""
    run = Path(run)
    if _distributed_rank() != 0 or not run.is_dir():
        return
    key = os.path.realpath(run)
    if key in _HELD_LOCKS:
        return
    fd = _open_lock(run)
    if not _try_lock(fd):
        os.close(fd)
        raise UserError(f"{run} is in use by another process that is training in it; two writers would corrupt "
                        f"each other's checkpoints and logs. Wait for it to finish (or stop it), or choose another "
                        f"--run_name")
    _HELD_LOCKS[key] = fd


def unlock_run(run: Path) -> None:
    fd = _HELD_LOCKS.pop(os.path.realpath(Path(run)), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def holds_lock(run: Path) -> bool:
    return os.path.realpath(Path(run)) in _HELD_LOCKS


def _recover_if_free(run: Path) -> None:
    """Recover an interrupted save for a reader: at once when this process is the writer, under a short lock when
    no one writes the folder, and not at all while another process writes it (the writer recovers it itself)."""
    if holds_lock(run) or not needs_recovery(run):
        if needs_recovery(run):
            recover(run)
        return
    fd = _open_lock(run)
    try:
        if _try_lock(fd):
            recover(run)
    finally:
        os.close(fd)  # releases the short lock


def begin_save(target: Path) -> Path:
    """A fresh, empty staging folder `<target>/.saving/` to write a complete checkpoint into."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / SAVING
    if os.path.lexists(staging) and not _is_real_dir(staging):
        raise _untrusted(staging, "is a symbolic link or not a folder")
    _remove(staging)
    staging.mkdir()
    _SAVES_IN_PROGRESS[str(target)] = staging
    return staging


def commit_save(target: Path) -> None:
    """Atomically declare `<target>/.saving/` complete, then move its items into `target`."""
    target = Path(target)
    staging = target / SAVING
    _fsync_tree(staging)
    os.replace(staging, target / READY)
    _SAVES_IN_PROGRESS.pop(str(target), None)
    _fsync_dir(target)
    _roll_forward(target)
    _fsync_dir(target)


_SAVES_IN_PROGRESS: dict[str, Path] = {}  # target -> its staging folder, between begin_save and commit_save

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def describe_write_error(error: OSError) -> str | None:
    """One line for a failed write (disk full, quota, read-only or forbidden folder, file too large): what failed
    and what is still intact. None for other errors."""
    if error.errno not in WRITE_ERRNOS:
        return None
    what = error.strerror or type(error).__name__
    where = f" ({error.filename})" if error.filename else ""
    if _SAVES_IN_PROGRESS:
        target = next(iter(_SAVES_IN_PROGRESS))
        return (f"could not write the checkpoint into {target}: {what}{where}. The checkpoint write was abandoned "
                f"before its commit point, so the last complete checkpoint in {target} is intact (its leftover "
                f".saving folder is discarded on resume); free space or fix the permissions, then resume")
    return (f"a write failed: {what}{where}; nothing was half-written (checkpoints and caches are "
            f"written beside the old ones and renamed into place); free space or fix the permissions and retry")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def debug_pause(stage: str, step: int | None = None) -> None:
    """Test hook: SAE_DEBUG_SAVE_DELAY="<step>:<seconds>[:<stage>]" sleeps inside the save of that step, at
    `stage` ("write": after the coder files, before state.json; "publish": between moving items into place)."""
    spec = os.environ.get("SAE_DEBUG_SAVE_DELAY")
    if not spec:
        return
    parts = spec.split(":")
    want_stage = parts[2] if len(parts) > 2 else "write"
    if step is not None:
        debug_pause.step = step  # type: ignore[attr-defined]
    if stage != want_stage or getattr(debug_pause, "step", None) != int(parts[0]):
        return
    print(f"debug: pausing {parts[1]} s inside the save of step {parts[0]} ({stage})", file=sys.stderr, flush=True)
    time.sleep(float(parts[1]))


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing state
# ---------------------------------------------------------------------------------------------------------------

def write_coder_state(folder: Path, tensors: dict[str, np.ndarray], optimizer: str, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_numpy(folder / CODER_STATE_FILE, tensors,
                           {"format": FORMAT, "version": str(VERSION), "optimizer": optimizer, "step": str(step)})


def read_coder_state(folder: Path, optimizer: str, params: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Read and check a coder's state.safetensors against the coder's parameter shapes."""
    path = Path(folder) / CODER_STATE_FILE
    tensors, meta = load_safetensors_numpy(path)
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{path}: {name} contains NaN or Inf values; this training state is corrupt and "
                                  f"resuming would train on it. Restore an earlier checkpoint or start over")
        if name in ("tokens_since_fired", "fire_count") and (value.dtype.kind not in "iu" or (value < 0).any()):
            raise CheckpointError(f"{path}: {name} must hold non-negative integer counts")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training-state file of this library (format {meta.get('format')!r})")
    if meta.get("optimizer") != optimizer:
        raise CheckpointError(f"{path}: holds {meta.get('optimizer')} state, but the run uses {optimizer}")
    if optimizer == "signum" and int(meta.get("version", 1)) < 2:
        raise CheckpointError(f"{path}: holds the state of the old signum (plain sign-SGD with momentum, state "
                              f"version {meta.get('version', 1)}); signum is schedule-free now and cannot continue "
                              f"it: start a new run (the checkpoint's sae.safetensors still loads)")
    expected = {"tokens_since_fired", "fire_count"}
    expected |= {optimizer_scalar_name(s) for s in OPTIMIZER_SCALARS[optimizer]}
    for param, shape in params.items():
        for slot in OPTIMIZER_SLOTS[optimizer]:
            name = optimizer_tensor_name(param, slot)
            expected.add(name)
            if name in tensors and tuple(tensors[name].shape) != tuple(shape):
                raise CheckpointError(f"{path}: {name} has shape {tensors[name].shape}, expected {shape}")
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing)}")
    return tensors


def write_run_state(folder: Path, state: dict) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    write_text_atomic(Path(folder) / STATE_FILE, json.dumps(state, indent=1, sort_keys=False) + "\n")


def read_run_state(run: Path) -> dict | None:
    """The run's state.json after recovering an interrupted save; None when the run has no checkpoint yet."""
    run = Path(run)
    if not run.is_dir():
        return None
    _check_no_links(run)
    _recover_if_free(run)
    path = run / STATE_FILE
    if not path.is_file():
        return None
    state = read_json(path, "a training state (state.json)")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training state of this library")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer version (state version {state['version']})")
    return state


def default_run_name(model: str, hookpoints: list[str]) -> str:
    base = Path(model.replace("builtin:", "")).name or "model"
    hooks = hookpoints[0] + (f"+{len(hookpoints) - 1}" if len(hookpoints) > 1 else "") if hookpoints else "sae"
    return f"{base}-{hooks}".replace("/", "_").replace("*", "all")


def choose_run_dir(save_dir: str, run_name: str | None, model: str, hookpoints: list[str], resume: bool,
                   overwrite: bool = False) -> Path:
    """The run folder: an explicit name is used as is (an existing checkpoint needs --resume or --overwrite);
    the default name gets -2, -3, ... when taken (and --resume picks the latest of them). The folder is returned
    locked for this process (`lock_run`): the caller is its only writer."""
    parent = Path(save_dir).expanduser()
    if run_name is not None:
        run = parent / run_name
        lock_run(run)  # first: a folder another process trains in is refused as such, whatever it holds
        if has_checkpoint(run) and not resume:
            if overwrite:  # its contents: the folder itself carries our lock
                for item in run.iterdir():
                    _remove(item)
            else:
                raise UserError(f"{run} already holds a checkpoint: pass --resume to continue it, --overwrite to "
                                f"start over, or choose another --run_name")
        if resume and not has_checkpoint(run):
            raise UserError(f"nothing to resume: {run} holds no checkpoint")
        run.mkdir(parents=True, exist_ok=True)
        lock_run(run)
        return run
    base = default_run_name(model, hookpoints)
    candidates = [parent / base] + [parent / f"{base}-{i}" for i in range(2, 1000)]
    if resume:
        taken = [c for c in candidates if has_checkpoint(c)]
        if not taken:
            raise UserError(f"nothing to resume: no checkpoint under {parent / base}[-N]; give --run_name")
        lock_run(taken[-1])
        return taken[-1]
    for c in candidates:  # the first free one; a folder another process has just taken (locked) is not free
        if not c.exists() or not any(c.iterdir()):
            c.mkdir(parents=True, exist_ok=True)
            try:
                lock_run(c)
            except UserError:
                continue
            if not any(c.iterdir()):  # still empty now that it is ours
                return c
            unlock_run(c)
    raise UserError(f"too many runs named {base} under {parent}; give --run_name")


def has_checkpoint(run: Path) -> bool:
    run = Path(run)
    return (run / STATE_FILE).is_file() or (run / READY).is_dir()


def find_coder_dirs(run: Path) -> dict[str, Path]:
    """{coder name: folder} of every coder checkpoint in a run folder (nested /seedN folders included)."""
    run = Path(run)
    out = {}
    for cfg in sorted(run.rglob("cfg.json")):
        rel = cfg.parent.relative_to(run)
        if rel.parts and rel.parts[0] not in RESERVED and not rel.parts[0].startswith("."):
            out["/".join(rel.parts)] = cfg.parent
    return out


# ---- resume and Ctrl-C handling, the same for both trainers ----

class SigintFlag:
    """Within the block, the first Ctrl-C (SIGINT) or SIGTERM (how clusters and job schedulers stop a job) only sets
    `raised` (the loop saves and stops after the current step); a second one interrupts at once (the checkpoint on
    disk stays intact: saves are atomic). `signal_name` says which signal came first."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.raised = False
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        self.signal_name = signal.Signals(signum).name
        what = "Interrupted" if signum == signal.SIGINT else f"Received {self.signal_name}"
        print(f"\n{what}: finishing this step, then saving (send it again to stop at once)", file=sys.stderr,
              flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handler)
        return self

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


def merge_resume_config(saved_state: dict, cfg: TrainConfig, explicit: set[str] | None) -> TrainConfig:
    """The config a resumed run continues with; refuses settings that would change the data order or state."""
    # checkpoints written before these settings existed trained as sparsify does: r = 0, AuxK's exact gradient
    saved = TrainConfig.from_dict({"average_power": 0.0, "auxk_raise_only": False, **saved_state["train_config"]})
    if explicit is not None:  # the CLI: start from the checkpoint's config, apply the flags given explicitly
        merged = replace(saved, sae=replace(saved.sae))
        for key in explicit:
            if key.startswith("sae."):
                setattr(merged.sae, key[4:], getattr(cfg.sae, key[4:]))
            else:
                setattr(merged, key, getattr(cfg, key))
        cfg = merged
    problems = incompatible_changes(saved, cfg)
    if problems:
        raise UserError("cannot resume with different settings (the data order and state depend on them): "
                        + "; ".join(problems))
    return cfg


def check_same_run(saved: dict, source, hookpoints: list[str]) -> None:
    saved_hooks = sorted({c["hookpoint"] for c in saved["coders"].values()})
    if saved_hooks != sorted(hookpoints):
        raise UserError(f"the checkpoint trained hookpoints {saved_hooks}, but this run resolves to {hookpoints}")
    old, new = saved.get("data", {}), dict(source.data_info)
    if new["kind"] == "cache" and re.fullmatch(r"\d+:\d+", str(old.get("fingerprint"))):
        # checkpoints written before caches had a manifest fingerprint stored "<tokens>:<shards>"
        new["fingerprint"] = f"{source.cache.total_tokens}:{len(source.cache.shards)}"
    if old.get("kind") == new["kind"] and old.get("fingerprint") and old.get("fingerprint") != new["fingerprint"]:
        if new["kind"] == "cache":
            raise UserError(f"the activation cache differs from the one this run was trained on (fingerprint "
                            f"{new['fingerprint']} vs {old['fingerprint']}): resume needs the same cache; give the "
                            f"run's cache with --activations, or start a new run")
        raise UserError("the training data differs from the checkpoint's (token fingerprint "
                        f"{new['fingerprint']} vs {old['fingerprint']}): resume needs the same dataset, tokenizer "
                        "and ctx_len")
