"""The training loop, once for both backends. `Loop.fit` is the whole algorithm; a backend adapter (`Backend` below:
sae_torch.trainer.TorchBackend, sae_mlx.trainer.MlxBackend) does what needs a framework, and a `Comms` object
(`SingleProcess` by default; sae_torch.distributed / sae_mlx.distributed for several processes) does what needs the
other ranks.

Design notes: docs/internals.md, section `sae_core/loop.py`.
"""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .activation_cache import cache_hookpoints
from .data import check_dataset, default_exclude_tokens, load_token_chunks
from .errors import UserError
from .metrics import MetricsLog, coder_stats, plot_run
from .sources import ShardedSource, load_model_source
from .train_config import TrainConfig
from .training_state import (BEST_DIR, SAVING, SigintFlag, begin_save, check_same_run, choose_run_dir, coder_names,
                             commit_save, debug_pause, lock_run, merge_resume_config, read_coder_state, read_run_state,
                             unlock_run, write_coder_state, write_run_state)


def total_loss(fvu, auxk, multi_topk_fvu, auxk_alpha: float):
    """The training loss (docs/SPEC.md, the forward pass), for numbers or arrays of any framework."""
    return fvu + auxk_alpha * auxk + multi_topk_fvu / 8


class Backend(Protocol):
    """What the loop needs from a framework. Arrays are the framework's; `c` is a `Coder`."""
    name: str  # "torch" or "mlx": written to state.json as who wrote it

    def scope(self): ...  # context for building and running the loop (MLX: the device's stream)
    def new_coder(self, d_in: int, d_out: int, cfg, seed: int): ...  # seeded, float32
    def load_coder(self, folder: Path): ...  # float32
    def make_optimizer(self, name: str, sae, average_power: float): ...
    def prepare(self, c: "Coder", cfg: TrainConfig) -> None: ...  # once its state is set (MLX: eval, build steps)
    def counters(self, m: int): ...  # int64 zeros [m]
    def to_numpy(self, array) -> np.ndarray: ...
    def from_numpy(self, array: np.ndarray): ...
    def param_shapes(self, sae) -> dict[str, tuple]: ...
    def all_finite(self, x, y) -> bool: ...
    def mean(self, y): ...  # float32 mean over rows
    def set_b_dec(self, sae, mean) -> None: ...
    def chunk(self, x, n: int) -> list: ...  # torch.chunk's split
    def total_variance(self, y): ...  # sum((y - mean(y))^2), float32 scalar
    def forward_backward(self, c: "Coder", xs: list, ys: list, dead_mask, weights: list, auxk_alpha: float
                         ) -> list[tuple]: ...  # accumulate gradients; per chunk (loss, fvu, auxk, multi, l0, counts)
    def optimizer_step(self, c: "Coder", lr: float, t: int, step_tokens: int) -> None: ...  # also the firing update
    def global_stats(self, y, comms) -> tuple: ...  # data parallel: (mean, total variance) of the global batch
    def all_sum_step(self, c: "Coder", comms) -> None: ...  # data parallel: sum gradients, fired, fire_delta
    def broadcast_coder(self, sae, comms) -> None: ...  # data parallel: rank 0's parameters everywhere
    def is_oom(self, error: BaseException) -> bool: ...
    def array_source(self, batches): ...  # an ArrayActivationSource of the caller's batches
    def cache_source(self, folder, batch_tokens: int, seed: int, hookpoints): ...
    def model_runner(self, cfg: TrainConfig) -> str: ...  # which sae_<runner>.activations runs the model
    def convert_batch(self, batch: dict) -> dict: ...  # a model runner's batch as this backend's arrays


class SingleProcess:
    """The trivial `Comms`: one process, which writes everything. A Comms has `rank`, `world` and these methods;
    the `what` arguments name the collective in the error a lost rank causes."""
    rank, world = 0, 1

    def all_sum(self, array, what: str):
        return array

    def all_sum_floats(self, values: list[float], what: str) -> list[float]:
        return list(values)

    def all_sum_int(self, value: int, what: str) -> int:
        return value

    def barrier(self, what: str) -> None:
        pass

    def share_text(self, text: str, what: str) -> str:
        """Rank 0's text on every rank."""
        return text

    def gather(self, obj, what: str) -> list:
        return [obj]

    def before_step(self, step: int) -> None:
        """Test hook of the distributed comms (SAE_DEBUG_DIE)."""


@dataclass
class Coder:
    """One sparse coder in training, with its optimizer and firing statistics (backend arrays)."""
    name: str
    hook: str
    seed: int
    sae: Any
    opt: Any
    lr: float
    tokens_since_fired: Any  # [M] int64
    fire_count: Any  # [M] int64
    fired: Any = None  # [M] bool, this step
    fire_delta: Any = None  # [M] int64, firings of this step (summed over the ranks before they count)
    sums: dict = field(default_factory=dict)  # metric sums since the last log line
    fvu_since_save: list = field(default_factory=list)  # logged FVUs since the last save (keep_best)
    last: dict = field(default_factory=dict)  # the last metrics record
    grads: Any = None  # backend use: gradients accumulated over the step (MLX)
    steps: Any = None  # backend use: compiled step functions (MLX)


def _item(value) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


class Loop:
    def __init__(self, cfg: TrainConfig, source, run: Path, saved: dict | None, backend: Backend, *,
                 progress: bool = True, stop_after_steps: int | None = None, plots: bool = True, comms=None):
        self.cfg, self.backend = cfg, backend
        self.comms = comms or SingleProcess()
        self.rank, self.world = self.comms.rank, self.comms.world
        self.modules = bool(cfg.distribute_modules) and self.world > 1
        self.data_parallel = self.world > 1 and not self.modules
        if self.modules and cfg.keep_best:
            raise UserError("keep_best is not supported with distribute_modules yet")
        if self.data_parallel:
            source = ShardedSource(source, self.rank, self.world, backend.mean)
        self.source, self.run, self.shared_run = source, Path(run), Path(run)
        self.progress, self.stop_after_steps, self.plots = progress and self.rank == 0, stop_after_steps, plots
        self._scratch = None
        if self.rank != 0:  # metrics and plots of other ranks go to a scratch folder, never the run folder
            self._scratch = Path(tempfile.mkdtemp(prefix=f"sae-{backend.name}-rank{self.rank}-"))
            self.run = self._scratch
        self.step = self.batches = self.tokens = 0
        self.elapsed = 0.0
        self._saved_step = 0
        self.best_fvu: dict[str, float] = {}
        self.coders: dict[str, Coder] = {}
        tokens_per_step = cfg.tokens_per_step(source.tokens_per_batch)
        for name, (hook, seed) in coder_names(source.hookpoints, cfg.init_seeds).items():
            d_in, d_out = source.widths[hook]
            sae = backend.load_coder(self.shared_run / name) if saved else backend.new_coder(d_in, d_out, cfg.sae,
                                                                                             seed)
            sae.auxk_raise_only = cfg.auxk_raise_only
            m = sae.num_latents
            opt = backend.make_optimizer(cfg.optimizer, sae, cfg.average_power)
            lr = cfg.lr or cfg.default_lr(m, tokens_per_step)
            self.coders[name] = Coder(name, hook, seed, sae, opt, lr, backend.counters(m), backend.counters(m))
        self.total_steps = cfg.total_steps(source.tokens_per_batch, source.batches_per_epoch)
        self.warmup = cfg.warmup_steps(self.total_steps)
        run_tokens = None if self.total_steps is None else self.total_steps * tokens_per_step
        self.dead_threshold = cfg.dead_threshold(run_tokens)
        if saved:
            self._load_state(saved)
        if self.modules:
            self.owner = owners({n: c.hook for n, c in self.coders.items()}, self.world)
            self.coders = {n: c for n, c in self.coders.items() if self.owner[n] == self.rank}
        for c in self.coders.values():
            if self.data_parallel:  # identical start on every rank (they are seeded alike anyway)
                backend.broadcast_coder(c.sae, self.comms)
            backend.prepare(c, cfg)

    # ------------------------------------------------------------------------------------------------------------
    # The algorithm
    # ------------------------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        log = MetricsLog(self.run, resume_step=self.step if self.step else None)
        batches = self.source.batches(start=self.batches)
        bar = self._progress_bar()
        stop = SigintFlag()
        start, window_start, window_tokens = time.perf_counter() - self.elapsed, time.perf_counter(), 0
        last_saved, lr_scale = self.step, 1.0
        with stop:
            while self.total_steps is None or self.step < self.total_steps:
                step_tokens = 0
                for c in self.coders.values():
                    c.fired = c.tokens_since_fired < 0  # all False
                    c.fire_delta = c.fire_count * 0
                for _ in range(cfg.grad_acc_steps):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    self.batches += 1
                    for c in self.coders.values():
                        x, y = batch[c.hook]
                        self._check_finite(x, y, c.hook)
                        self._forward_backward(c, x, y, first=self.step == 0 and step_tokens == 0)
                    step_tokens += next(iter(batch.values()))[0].shape[0]
                if step_tokens == 0:  # the activation source ran out
                    break
                self.comms.before_step(self.step)
                if self.data_parallel:
                    step_tokens = self.comms.all_sum_int(step_tokens, "the token-count all-reduce")
                lr_scale = cfg.lr_at(self.step, 1.0, self.warmup, self.total_steps)
                for c in self.coders.values():
                    if self.data_parallel:
                        self.backend.all_sum_step(c, self.comms)
                    self.backend.optimizer_step(c, c.lr * lr_scale, self.step + 1, step_tokens)
                self.step += 1
                self.tokens += step_tokens
                window_tokens += step_tokens
                bar.update(self.source.tokens_per_batch * cfg.grad_acc_steps)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    record = self._log_record(lr_scale, window_tokens / max(now - window_start, 1e-9),
                                              now - start)
                    log.write(record)
                    bar.set_postfix_str(self._postfix(record))
                    window_start, window_tokens = now, 0
                if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
                    stop.raised = True  # a planned pause: save and return as if interrupted
                if self.step % cfg.save_every == 0 or stop.raised:
                    self.elapsed = time.perf_counter() - start
                    self.save()
                    last_saved = self.step
                if stop.raised:
                    break
        bar.close()
        if any(c.sums for c in self.coders.values()):  # steps since the last log line
            now = time.perf_counter()
            record = self._log_record(lr_scale, window_tokens / max(now - window_start, 1e-9), now - start)
            if not stop.raised:  # a paused run's partial window is not logged: its resumption logs it
                log.write(record)
        self.elapsed = time.perf_counter() - start
        if self.step != last_saved:
            self.save()
        return self._finish(interrupted=stop.raised)

    def _forward_backward(self, c: Coder, x, y, first: bool) -> None:
        cfg, b = self.cfg, self.backend
        xs, ys = b.chunk(x, cfg.micro_acc_steps), b.chunk(y, cfg.micro_acc_steps)
        if self.data_parallel:
            mean, total_variance = b.global_stats(y, self.comms)
            mean = self.source.first_mean.get(c.hook, mean)  # the 1-rank value where the source has it
        else:
            mean = b.mean(y) if first else None
            total_variance = b.total_variance(y) if len(xs) > 1 else None
        if first:
            b.set_b_dec(c.sae, mean)
        dead_mask = c.tokens_since_fired >= self.dead_threshold if cfg.auxk_alpha > 0 else None
        weights = [1.0 / cfg.grad_acc_steps if total_variance is None else
                   b.total_variance(y_c) / total_variance / cfg.grad_acc_steps for y_c in ys]
        results = b.forward_backward(c, xs, ys, dead_mask, weights, cfg.auxk_alpha)
        l0_share = len(xs) * (self.world if self.data_parallel else 1)
        for weight, (loss, fvu, auxk, multi, l0, counts) in zip(weights, results):
            if not math.isfinite(loss):
                where = f" on rank {self.rank}" if self.world > 1 else ""
                raise UserError(f"the loss of {c.name} became {loss} at step {self.step}{where}; nothing was "
                                f"saved after the last checkpoint. Lower --lr or check the activations")
            c.fired = c.fired | (counts > 0)
            c.fire_delta = c.fire_delta + counts
            scale = _item(weight) * cfg.grad_acc_steps
            for key, value in (("fvu", fvu), ("auxk", auxk), ("multi_topk_fvu", multi)):
                c.sums[key] = c.sums.get(key, 0.0) + value * scale
            c.sums["l0"] = c.sums.get("l0", 0.0) + l0 / l0_share
        c.sums["batches"] = c.sums.get("batches", 0) + 1

    def _check_finite(self, x, y, hook: str) -> None:
        if not self.backend.all_finite(x, y):
            saved = f"the checkpoint of step {self._saved_step} is kept" if self._saved_step else "nothing was saved"
            raise UserError(f"non-finite activations (NaN or Inf) at step {self.step}, hookpoint {hook!r} "
                            f"(data batch {self.batches - 1}); training stopped and {saved}. "
                            f"Try --dtype float32, or exclude the offending tokens")

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------

    def _log_record(self, lr_scale: float, tokens_per_s: float, elapsed: float) -> dict:
        keys = ("fvu", "auxk", "multi_topk_fvu", "l0")
        if self.data_parallel:
            for c in self.coders.values():
                c.sums.update(zip(keys, self.comms.all_sum_floats([c.sums.get(k, 0.0) for k in keys],
                                                                  "the metrics all-reduce")))
        record = {"step": self.step, "tokens": self.tokens,
                  "lr": next(iter(self.coders.values())).lr * lr_scale,
                  "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed, 2)}
        for name, c in self.coders.items():
            n = max(c.sums.get("batches", 0), 1)
            for key in keys:
                record[f"{key}/{name}"] = c.sums.get(key, 0.0) / n
            dead = self.backend.to_numpy(c.tokens_since_fired) >= self.dead_threshold
            record[f"dead_pct/{name}"] = 100.0 * float(dead.mean())
            c.fvu_since_save.append(record[f"fvu/{name}"])
            c.last = record
            c.sums = {}
        if self.modules:
            merged = {}
            for part in self.comms.gather(record, "the metrics gather"):
                merged.update(part)
            record = merged
        return record

    def _postfix(self, record: dict) -> str:
        names = [k[len("fvu/"):] for k in record if k.startswith("fvu/")]
        return ", ".join(f"{f'{n} ' if len(names) > 1 else ''}fvu={record[f'fvu/{n}']:.3f} "
                         f"dead={record[f'dead_pct/{n}']:.1f}%" for n in names)

    def _progress_bar(self):
        from tqdm.auto import tqdm

        per_step = self.source.tokens_per_batch * self.cfg.grad_acc_steps
        return tqdm(total=None if self.total_steps is None else self.total_steps * per_step,
                    initial=self.step * per_step, unit="tok", unit_scale=True, desc="Training",
                    disable=not self.progress, dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------------------------------------------------------
    # Saving, loading, finishing
    # ------------------------------------------------------------------------------------------------------------

    def run_state(self) -> dict:
        cfg = self.cfg
        return {
            "backend": self.backend.name, "step": self.step, "batches": self.batches, "tokens": self.tokens,
            "total_steps": self.total_steps, "warmup_steps": self.warmup, "dead_threshold": self.dead_threshold,
            "lr": {n: c.lr for n, c in self.coders.items()},
            "coders": {n: {"hookpoint": c.hook, "seed": c.seed, "d_in": c.sae.d_in, "d_out": c.sae.d_out,
                           "num_latents": c.sae.num_latents} for n, c in self.coders.items()},
            "best_fvu": self.best_fvu,
            "data": self.source.data_info,
            "rng": {"init_seeds": list(cfg.init_seeds), "data_seed": cfg.seed},
            "train_config": cfg.to_dict(),
            "elapsed_s": round(self.elapsed, 3),
        }

    def _write_coder(self, c: Coder, folder: Path) -> None:
        """The coder's weights (at the optimizer's evaluation point) and its training state."""
        c.opt.eval()
        c.sae.save_to_disk(folder)
        c.opt.train()
        tensors = {"tokens_since_fired": c.tokens_since_fired, "fire_count": c.fire_count, **c.opt.state_tensors()}
        write_coder_state(folder, {k: self.backend.to_numpy(v) for k, v in tensors.items()}, self.cfg.optimizer,
                          self.step)
        debug_pause("write", self.step)

    def save(self) -> None:
        if self.modules:
            self._save_modules()
        elif self.rank == 0:
            if self.cfg.keep_best:
                self._save_best()
            staging = begin_save(self.shared_run)
            for name, c in self.coders.items():
                self._write_coder(c, staging / name)
            write_run_state(staging, self.run_state())
            commit_save(self.shared_run)
        self.comms.barrier("the checkpoint barrier")
        self._saved_step = self.step
        for c in self.coders.values():
            c.fvu_since_save = []

    def _save_modules(self) -> None:
        """distribute_modules: rank 0 opens the staging folder, every owner writes its coders into it, rank 0
        writes state.json (all coders) and publishes the checkpoint."""
        state = self.run_state()  # this rank's coders
        parts = self.comms.gather({k: state[k] for k in ("lr", "coders", "best_fvu")}, "the checkpoint gather")
        if self.rank == 0:
            begin_save(self.shared_run)
        self.comms.barrier("the checkpoint barrier")
        staging = self.shared_run / SAVING
        for name, c in self.coders.items():
            self._write_coder(c, staging / name)
        self.comms.barrier("the checkpoint barrier")
        if self.rank == 0:
            for key in ("lr", "coders", "best_fvu"):
                state[key] = {k: v for part in parts for k, v in part[key].items()}
            order = {n: i for i, n in enumerate(coder_names(self.source.hookpoints, self.cfg.init_seeds))}
            state["coders"] = dict(sorted(state["coders"].items(), key=lambda kv: order.get(kv[0], 0)))
            write_run_state(staging, state)
            commit_save(self.shared_run)

    def _save_best(self) -> None:
        improved = {}
        for name, c in self.coders.items():
            if c.fvu_since_save:
                fvu = float(np.mean(c.fvu_since_save))
                if fvu < self.best_fvu.get(name, float("inf")):
                    improved[name] = fvu
        if not improved:
            return
        best = self.shared_run / BEST_DIR
        staging = begin_save(best)
        for name in improved:
            c = self.coders[name]
            c.opt.eval()
            c.sae.save_to_disk(staging / name)
            c.opt.train()
        commit_save(best)
        self.best_fvu.update(improved)

    def _load_state(self, saved: dict) -> None:
        self.step, self.batches, self.tokens = saved["step"], saved["batches"], saved["tokens"]
        self.elapsed, self.best_fvu = saved.get("elapsed_s", 0.0), dict(saved.get("best_fvu", {}))
        self._saved_step = self.step
        self.warmup = saved.get("warmup_steps", self.warmup) if self.cfg.lr_warmup_steps is None else self.warmup
        if self.cfg.dead_feature_threshold is None:  # the default stays the first run's (resumes may change its length)
            self.dead_threshold = saved.get("dead_threshold", self.cfg.dead_threshold(None))
        b = self.backend
        for name, c in self.coders.items():
            tensors = read_coder_state(self.shared_run / name, self.cfg.optimizer, b.param_shapes(c.sae))
            c.opt.load_state_tensors(tensors)  # NumPy: a framework array could round the float64 scalars
            c.tokens_since_fired = b.from_numpy(tensors["tokens_since_fired"].astype(np.int64))
            c.fire_count = b.from_numpy(tensors["fire_count"].astype(np.int64))
            c.lr = saved.get("lr", {}).get(name, c.lr) if self.cfg.lr is None else c.lr

    def _finish(self, interrupted: bool) -> dict:
        b = self.backend
        coders = {}
        for name, c in self.coders.items():
            stats = coder_stats(b.to_numpy(c.fire_count), b.to_numpy(c.tokens_since_fired),
                                self.dead_threshold)
            coders[name] = {"fvu": c.last.get(f"fvu/{name}", float("nan")),
                            "l0": c.last.get(f"l0/{name}", float("nan")), **stats}
        plots = []
        if self.plots and self.rank == 0:
            plots = plot_run(self.run, {n: b.to_numpy(c.fire_count) for n, c in self.coders.items()}, self.tokens)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        if self.modules:
            coders = {k: v for part in self.comms.gather(coders, "the result gather") for k, v in part.items()}
        result = {"run_dir": str(self.shared_run), "step": self.step, "tokens": self.tokens,
                  "elapsed_s": self.elapsed, "interrupted": interrupted, "coders": coders,
                  "plots": [str(p) for p in plots]}
        if self.world > 1:
            result["rank"], result["world_size"] = self.rank, self.world
        return result


def owners(coder_hooks: dict[str, str], world: int) -> dict[str, int]:
    """{coder: rank} for distribute_modules: hookpoints in contiguous groups (numpy.array_split), seeds follow."""
    hooks = list(dict.fromkeys(coder_hooks.values()))
    if len(hooks) < world:
        raise UserError(f"distribute_modules needs at least as many hookpoints as ranks: {len(hooks)} hookpoint(s) "
                        f"for {world} ranks")
    rank_of = {h: r for r, group in enumerate(np.array_split(np.arange(len(hooks)), world)) for h in
               (hooks[i] for i in group)}
    return {name: rank_of[hook] for name, hook in coder_hooks.items()}


# ---------------------------------------------------------------------------------------------------------------
# Setup: config -> activation source -> run folder -> loop
# ---------------------------------------------------------------------------------------------------------------

def _read_run_state(run: Path, comms) -> dict | None:
    """Rank 0 reads first (recovering an interrupted save), then the others."""
    if comms.rank == 0:
        state = read_run_state(run)
        comms.barrier("reading the checkpoint")
        return state
    comms.barrier("reading the checkpoint")
    return read_run_state(run)


def _choose_run_dir(comms, *args) -> Path:
    """Rank 0 chooses the run folder (or finds the mistake), every rank gets its answer."""
    answer = ""
    if comms.rank == 0:
        try:
            answer = "ok:" + str(choose_run_dir(*args))
        except UserError as e:
            answer = "error:" + str(e)[:2000]
    answer = comms.share_text(answer, "choosing the run folder")
    if answer.startswith("error:"):
        raise UserError(answer[len("error:"):])
    return Path(answer[len("ok:"):])


def train(cfg: TrainConfig, make_backend, make_loop, source=None, *, resume: bool | str = False,
          explicit: set[str] | None = None, overwrite: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, plots: bool = True, comms=None) -> dict:
    """Shared body of `sae_torch.trainer.train` and `sae_mlx.trainer.train` (read their docstrings).
    `make_backend(cfg)` gives the Backend for the (resumed) config, `make_loop(cfg, source, run, saved, backend,
    **options)` the backend's Loop."""
    cfg.validate()
    comms = comms or SingleProcess()
    progress = progress and comms.rank == 0
    saved = None
    run = None
    try:
        if resume and (isinstance(resume, (str, Path)) or cfg.run_name):
            run = Path(resume) if isinstance(resume, (str, Path)) else Path(cfg.save_dir).expanduser() / cfg.run_name
            if comms.rank == 0:
                lock_run(run)  # before reading: recovery writes, and a second writer must be refused before it starts
            saved = _read_run_state(run, comms)
            if saved is None:
                raise UserError(f"nothing to resume: {run} holds no checkpoint")
            cfg = merge_resume_config(saved, cfg, explicit)
        backend = make_backend(cfg)
        with backend.scope():
            make_source = tokenizer = None
            if source is not None and not hasattr(source, "batches"):
                source = backend.array_source(source)
            if source is None and cfg.activations:
                source = backend.cache_source(cfg.activations, cfg.batch_size * cfg.ctx_len, cfg.seed,
                                              cache_hookpoints(cfg))
            if source is None:
                check_dataset(cfg.dataset)  # before the (slow) model load
                model_dtype = (saved or {}).get("data", {}).get("model_dtype")
                hookpoints, make_source, tokenizer, model_dtype = load_model_source(cfg, backend, dtype=model_dtype)
            else:
                hookpoints = source.hookpoints
                if source.transcode != cfg.sae.transcode:
                    kind = 'a transcoder' if source.transcode else 'an autoencoder'
                    raise UserError(f"the activations are for {kind}"
                                    f" but the config says transcode={cfg.sae.transcode}")
            if run is None:
                run = _choose_run_dir(comms, cfg.save_dir, cfg.run_name, cfg.model, hookpoints, bool(resume), overwrite)
                if resume:
                    saved = _read_run_state(run, comms)
                    cfg = merge_resume_config(saved, cfg, explicit)
            if make_source is not None:
                if saved is not None and saved["data"].get("model_dtype") not in (None, model_dtype):
                    # `dtype auto` resolved differently here (another runner or device): keep the run's precision
                    hookpoints, make_source, tokenizer, model_dtype = load_model_source(
                        cfg, backend, dtype=saved["data"]["model_dtype"])
                exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
                limit = cfg.max_tokens if saved is None else saved["data"].get("read_tokens", cfg.max_tokens)
                chunks = load_token_chunks(cfg.dataset, cfg.split, tokenizer, cfg.ctx_len, limit, cfg.text_column)
                source = make_source(chunks, exclude)
                source.data_info["read_tokens"] = limit
                source.data_info["model_dtype"] = model_dtype  # checked and kept on resume, whichever runner resumes
            if saved is not None:
                check_same_run(saved, source, hookpoints)
            loop = make_loop(cfg, source, run, saved, backend=backend, progress=progress,
                             stop_after_steps=stop_after_steps, plots=plots, comms=comms)
            if progress:
                what = ", ".join(f"{n} (d_in={c.sae.d_in}, M={c.sae.num_latents}, k={cfg.sae.k}, lr={c.lr:.2e})"
                                 for n, c in loop.coders.items())
                verb = f"Resuming at step {loop.step}" if saved else "Training"
                steps = f"{loop.total_steps} steps" if loop.total_steps else "until the data ends"
                print(f"{verb}: {what}; {steps} of {source.tokens_per_batch * cfg.grad_acc_steps} tokens; "
                      f"saving to {run}", file=sys.stderr, flush=True)
            try:
                return loop.fit()
            except UserError:
                raise
            except Exception as e:
                if backend.is_oom(e):
                    raise UserError(f"out of memory at step {loop.step} ({type(e).__name__}): lower --batch_size, "
                                    f"or keep it and split the work with --grad_acc_steps N "
                                    f"(N batches per optimizer step) "
                                    f"or --micro_acc_steps N (each batch in N chunks); the last checkpoint is intact"
                                    ) from None
                raise
    finally:
        if run is not None:
            unlock_run(run)  # choose_run_dir (new runs) and lock_run (resumes) took it
