"""The run folder and the training-state layout, defined once for both backends (safetensors + JSON, no pickle).

A run folder, e.g. `runs/smollm2-layers.15/`:

    layers.15/                  one folder per coder, sparsify's layout (SparseCoder.load_from_disk reads it)
        cfg.json                  the coder's config + d_in (sparsify's)
        sae.safetensors           encoder.weight, encoder.bias, W_dec, b_dec[, W_skip] (sparsify's)
        state.safetensors         this coder's training state, tensors below
    state.json                  run-level training state, keys below
    best/layers.15/{cfg.json, sae.safetensors}   with keep_best: the lowest-FVU checkpoint per coder
    metrics.jsonl               one JSON object per logged step (sae_core.metrics)
    plots/*.png                 loss curves, latent firing-frequency histograms (written at the end)

With several init_seeds a coder is named `<hookpoint>/seed<n>` and its folder nests accordingly.

`state.safetensors` (per coder; all float tensors float32, counters int64):
    tokens_since_fired            [M] int64   tokens since each latent last fired (activation > 0)
    fire_count                    [M] int64   tokens on which each latent fired since the run started
    optimizer.<param>.<slot>      [shape of <param>] float32, <param> one of encoder.weight, encoder.bias, W_dec,
                                  b_dec, W_skip; slots (OPTIMIZER_SLOTS):
                                    signum (schedule-free): `z` (the sign-SGD iterate), `y` (the train point: the
                                      parameters where gradients are taken; sae.safetensors holds the eval point
                                      x, the average of the z iterates, as sparsify saves it)
                                    adam: `exp_avg`, `exp_avg_sq`
    optimizer.<scalar>            [1], signum only (OPTIMIZER_SCALARS): `k` int64 (steps taken), `lr_max` float64
                                  (largest lr so far), `weight_sum` float64 (sum of lr_max^2 over the steps): the
                                  averaging weights of schedulefree's ScheduleFreeWrapper
    metadata: format, version, optimizer, step (strings)
Version 1 files hold signum state `momentum` of the plain sign-SGD with momentum that signum was before version 2;
such a file is refused for signum (a different optimizer), its adam state still loads.

`state.json` (run level):
    format, version               "sae-twins/train-state", 2 (VERSION)
    backend                       "torch" or "mlx": who wrote it (either may resume it)
    step                          optimizer steps done (adam's bias correction uses t = step after increment)
    batches                       data position: batches consumed from the activation source
    tokens                        tokens trained on (after excluded tokens are dropped)
    total_steps, warmup_steps     the schedule (lr of step s = TrainConfig.lr_at(s, lr[name], warmup_steps))
    lr                            {coder: base learning rate}
    coders                        {coder: {hookpoint, seed, d_in, d_out, num_latents}}
    best_fvu                      {coder: lowest FVU saved to best/} (keep_best)
    data                          {kind, fingerprint, num_chunks, tokens_per_batch}: checked on resume
    rng                           {init_seeds, data_seed}: no randomness is drawn after initialisation, and the
                                  data order is a function of (data_seed, batch number), so seeds are the RNG state
    train_config                  TrainConfig.to_dict()
    elapsed_s                     training wall time so far

Atomic checkpoints. A save writes the whole checkpoint (coder folders + state.json, state.json last) into
`<run>/.saving/`, renames that to `<run>/.ready/` (the commit point: from here on the new checkpoint is complete),
then moves each item of `.ready/` into the run folder, replacing the old one, and removes `.ready/`. `recover()`,
called before any read, deletes a leftover `.saving/` (an interrupted write: the previous checkpoint is intact)
and finishes moving a leftover `.ready/` (roll forward). So a crash, Ctrl-C or SIGKILL at any instant leaves
either the previous or the new checkpoint, complete. The same scheme keeps `best/` consistent.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checkpoint import load_safetensors_numpy, save_safetensors_numpy, write_text_atomic
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


def _roll_forward(target: Path) -> None:
    ready = target / READY
    for item in sorted(ready.iterdir()):
        dest = target / item.name
        _remove(dest)
        os.replace(item, dest)
        debug_pause("publish")
    ready.rmdir()


def recover(target: Path) -> list[str]:
    """Finish or discard an interrupted save in `target` (a run folder or its best/); returns what was done."""
    done = []
    target = Path(target)
    if (target / SAVING).exists():
        _remove(target / SAVING)
        done.append(f"discarded an incomplete checkpoint write in {target / SAVING}")
    if (target / READY).exists():
        _roll_forward(target)
        done.append(f"finished installing the checkpoint left in {target / READY}")
    if (target / BEST_DIR).is_dir():
        done += recover(target / BEST_DIR)
    return done


def begin_save(target: Path) -> Path:
    """A fresh, empty staging folder `<target>/.saving/` to write a complete checkpoint into."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / SAVING
    _remove(staging)
    staging.mkdir()
    return staging


def commit_save(target: Path) -> None:
    """Atomically declare `<target>/.saving/` complete, then move its items into `target`."""
    target = Path(target)
    staging = target / SAVING
    _fsync_tree(staging)
    os.replace(staging, target / READY)
    _fsync_dir(target)
    _roll_forward(target)
    _fsync_dir(target)


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
    recover(run)
    path = run / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise CheckpointError(f"{path}: not valid JSON") from None
    if state.get("format") != FORMAT:
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
    the default name gets -2, -3, ... when taken (and --resume picks the latest of them)."""
    parent = Path(save_dir).expanduser()
    if run_name is not None:
        run = parent / run_name
        if has_checkpoint(run) and not resume:
            if overwrite:
                _remove(run)
            else:
                raise UserError(f"{run} already holds a checkpoint: pass --resume to continue it, --overwrite to "
                                f"start over, or choose another --run_name")
        if resume and not has_checkpoint(run):
            raise UserError(f"nothing to resume: {run} holds no checkpoint")
        return run
    base = default_run_name(model, hookpoints)
    candidates = [parent / base] + [parent / f"{base}-{i}" for i in range(2, 1000)]
    if resume:
        taken = [c for c in candidates if has_checkpoint(c)]
        if not taken:
            raise UserError(f"nothing to resume: no checkpoint under {parent / base}[-N]; give --run_name")
        return taken[-1]
    for c in candidates:
        if not c.exists() or not any(c.iterdir()):
            return c
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
    """Within the block, the first Ctrl-C only sets `raised` (the loop saves and stops after the current step);
    a second one interrupts at once (the checkpoint on disk stays intact: saves are atomic)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        print("\nInterrupted: finishing this step, then saving (Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def merge_resume_config(saved_state: dict, cfg: TrainConfig, explicit: set[str] | None) -> TrainConfig:
    """The config a resumed run continues with; refuses settings that would change the data order or state."""
    saved = TrainConfig.from_dict(saved_state["train_config"])
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
    old, new = saved.get("data", {}), source.data_info
    if old.get("kind") == new["kind"] and old.get("fingerprint") and old.get("fingerprint") != new["fingerprint"]:
        raise UserError("the training data differs from the checkpoint's (token fingerprint "
                        f"{new['fingerprint']} vs {old['fingerprint']}): resume needs the same dataset, tokenizer "
                        "and ctx_len")
