"""Training loop, MLX side: the mirror of `sae_torch/trainer.py`, name for name and step for step. The whole
algorithm is `Trainer.fit` (one page); the rest is setup and bookkeeping.

Per optimizer step, for every coder (one per hookpoint and init seed), on grad_acc_steps batches {hook: (x, y)}:
    (first step of a fresh run: b_dec <- mean of the first batch's targets y)
    dead_mask = tokens_since_fired >= dead_feature_threshold          (only when auxk_alpha > 0)
    for each of micro_acc_steps chunks c of the batch:
        out  = sae(x_c, y_c, dead_mask=dead_mask)
        loss = (fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8) * TV_c / TV / grad_acc_steps
               (TV_c / TV: each chunk's terms are renormalised by the whole batch's total variance, so chunking
               leaves the loss unchanged)
        grads += d loss / d params                                    (nn.value_and_grad)
        fired |= latents with activation > 0 in this chunk
    (normalize_decoder, autoencoders only, as sparsify: remove the W_dec gradient's component along each row)
    optimizer step with lr = TrainConfig.lr_at(step, base_lr, warmup, total_steps)      (sae_mlx.optim: Signum or Adam)
    (normalize_decoder: renormalise W_dec rows to unit norm)
    tokens_since_fired += tokens of the step; tokens_since_fired[fired] = 0

The data position (batches consumed), optimizer moments, tokens_since_fired and step are saved every save_every
steps in the layout of sae_core.training_state, so `resume` continues bit for bit (same device), and a run saved
by either backend resumes on the other (same tensors, same names, same run-level state.json).

Differences forced by MLX (everything else is the torch trainer's, including the errors and messages):

* Gradients are values: each chunk's gradient tree is added into `Coder.grads`, which the optimizer step
  consumes (torch accumulates into `.grad`). A batch's work is evaluated (`mx.eval`) at the end of each batch,
  where torch's eager execution would have computed it anyway; the loss's finiteness is checked there (torch checks
  each chunk before its backward; either way the run stops with the same error and nothing is saved).
* Compilation (`SAE_MLX_COMPILE`, see `compile_mode`): off by default (measured no faster on Linux CPU).
  `update` compiles the optimizer update (decoder-gradient projection, Signum/Adam, renormalisation) with
  `inputs/outputs = [coder.state, opt.state]`; `all` compiles each chunk's forward+backward too: the dead_mask is
  an input of the compiled function, so one graph serves every number of dead latents (the coder's fixed-size
  AuxK, see sae_mlx.sparse_coder), and steps where no latent is dead use a second graph without AuxK. Every mode
  computes the eager path's math, which mirrors torch operation for operation.
* Activations: an mlx-lm model, or a torch model (transformers) whose activations are converted to MLX, an
  activation cache, or arrays (sae_mlx.activations; `model_runner` picks the language-model runner).
* `device`: auto (MLX's default device: the GPU on Apple silicon), cpu, gpu.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from sae_core.data import default_exclude_tokens, load_token_chunks
from sae_core.errors import UserError
from sae_core.metrics import MetricsLog, coder_stats, plot_run
from sae_core.train_config import TrainConfig
from sae_core.training_state import (BEST_DIR, SigintFlag, begin_save, check_same_run, choose_run_dir, coder_names,
                                     commit_save, debug_pause, merge_resume_config, read_coder_state,
                                     read_run_state, write_coder_state, write_run_state)

from .activations import (ArrayActivationSource, CacheActivationSource, choose_model_runner, load_model_source,
                          resolve_device, to_numpy)
from .optim import Optimizer, flat_grads, make_optimizer
from .sparse_coder import SparseCoder

BACKEND = "mlx"


COMPILE_MODES = ("off", "update", "all")


def compile_mode(compiled: bool | str | None = None) -> str:
    """What is `mx.compile`d: "off" (nothing; the default), "update" (the optimizer update with the decoder
    projection and renormalisation), "all" (also each chunk's forward+backward). `compiled`: True = "all",
    False = "off", a mode name, or None = $SAE_MLX_COMPILE (0/1 or a mode name), else "off".

    Measured on Linux x86-64 CPU (MLX 0.32.4, 2 busy cores; d_in 64-576, M 1k-8k, k 16-32, 256-1024 tokens):
    the compiled forward+backward is no faster than the eager one, and up to 2.4x slower when a few latents are
    dead (its fixed-size AuxK takes d_out // 2 slots where the eager one takes num_dead); the compiled update is
    1.2x faster than the eager one for Adam but 2x slower for signum, and either way 1-2% of a step. So nothing is
    compiled by default here. Every mode computes the same run (tests/test_train_mlx.py); on Apple silicon,
    where fusing matters more, measure `SAE_MLX_COMPILE=update` and `=all`."""
    if compiled is None:
        compiled = os.environ.get("SAE_MLX_COMPILE", "") or "off"
    if compiled is True or compiled == "1":
        return "all"
    if compiled is False or compiled == "0":
        return "off"
    if compiled not in COMPILE_MODES:
        raise UserError(f"SAE_MLX_COMPILE / compiled must be one of 0, 1, {', '.join(COMPILE_MODES)}; "
                        f"got {compiled!r}")
    return compiled


@dataclass
class Coder:
    """One sparse coder in training, with its optimizer and firing statistics."""
    name: str
    hook: str
    seed: int
    sae: SparseCoder
    opt: Optimizer
    lr: float
    tokens_since_fired: mx.array  # [M] int64
    fire_count: mx.array  # [M] int64
    fired: mx.array = None  # [M] bool, this step
    sums: dict = field(default_factory=dict)  # metric sums since the last log line
    fvu_since_save: list = field(default_factory=list)  # logged FVUs since the last save (keep_best)
    last: dict = field(default_factory=dict)  # the last metrics record
    grads: dict | None = None  # gradients accumulated over the step (flat, by parameter name)
    steps: "StepFunctions" = None  # the chunk forward/backward and the optimizer update (compiled or eager)


class StepFunctions:
    """A coder's forward/backward of one chunk and its optimizer update, compiled with `mx.compile` or eager.

    `chunk(x, y, dead_mask, weight)` -> (grads, (loss, fvu, auxk_loss, multi_topk_fvu, l0, fire_counts)):
    grads of loss * weight by parameter name; loss unweighted; fire_counts [M] int32, the tokens of the chunk on
    which each latent fired. `update(grads, lr, t)` projects the decoder gradient (normalize_decoder), steps the
    optimizer and renormalises the decoder rows."""

    def __init__(self, sae: SparseCoder, opt: Optimizer, auxk_alpha: float, mode: str = "off"):
        self.sae, self.opt, self.mode = sae, opt, compile_mode(mode)
        num_latents = sae.num_latents

        def loss_fn(x, y, dead_mask, weight):
            out = sae(x, y, dead_mask=dead_mask)
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            return loss * weight, (loss, out.fvu, out.auxk_loss, out.multi_topk_fvu, out.latent_acts,
                                   out.latent_indices)

        value_and_grad = nn.value_and_grad(sae, loss_fn)

        def chunk(x, y, dead_mask, weight):
            (_, (loss, fvu, auxk, multi, acts, indices)), grads = value_and_grad(x, y, dead_mask, weight)
            active = acts > 0
            counts = mx.zeros((num_latents,), dtype=mx.int32).at[indices.reshape(-1)].add(
                active.reshape(-1).astype(mx.int32))
            l0 = active.sum(-1).astype(mx.float32).mean()
            return flat_grads(grads), (loss, fvu, auxk, multi, l0, counts)

        normalize = sae.cfg.normalize_decoder and not sae.cfg.transcode

        def update(grads, lr, t, scalars):
            if normalize and grads.get("W_dec") is not None:
                grads = sae.remove_gradient_parallel_to_decoder_directions(grads)
            opt.step(grads, lr, t, scalars)
            if normalize:
                sae.set_decoder_norm_to_unit_norm()

        self._chunk_eager, self._update_eager = chunk, update
        state = [sae.state, opt.state]
        if self.mode == "all":
            self._chunk_dead = mx.compile(chunk, inputs=state, outputs=state)
            self._chunk_alive = mx.compile(lambda x, y, weight: chunk(x, y, None, weight), inputs=state,
                                           outputs=state)
        if self.mode != "off":
            self._update = mx.compile(update, inputs=state, outputs=state)

    def chunk(self, x, y, dead_mask, weight):
        if self.mode != "all":
            return self._chunk_eager(x, y, dead_mask, weight)
        weight = mx.array(weight, dtype=mx.float32) if not isinstance(weight, mx.array) else weight
        if dead_mask is None or not bool(dead_mask.any()):
            return self._chunk_alive(x, y, weight)
        return self._chunk_dead(x, y, dead_mask, weight)

    def update(self, grads, lr: float, t: int) -> None:
        scalars = self.opt.step_scalars(lr, t)  # on the host, once per step (sae_mlx.optim)
        if self.mode == "off":
            self._update_eager(grads, lr, t, scalars)
            return
        # lr and t as arrays: a compiled function recompiles when a Python number changes
        self._update(grads, mx.array(lr, dtype=mx.float32), mx.array(t, dtype=mx.int32), scalars)


class Trainer:
    def __init__(self, cfg: TrainConfig, source, run: Path, saved: dict | None, device: mx.Device | None = None,
                 progress: bool = True, stop_after_steps: int | None = None, plots: bool = True,
                 compiled: bool | str | None = None):
        self.cfg, self.source, self.run, self.device, self.progress = cfg, source, run, device, progress
        self.stop_after_steps, self.plots = stop_after_steps, plots
        self.compile_mode = compile_mode(compiled)
        self.step = self.batches = self.tokens = 0
        self.elapsed = 0.0
        self.best_fvu: dict[str, float] = {}
        self.coders: dict[str, Coder] = {}
        for name, (hook, seed) in coder_names(source.hookpoints, cfg.init_seeds).items():
            d_in, d_out = source.widths[hook]
            if saved:
                sae = SparseCoder.load_from_disk(run / name, dtype=mx.float32)
            else:
                mx.random.seed(seed)
                sae = SparseCoder(d_in, cfg.sae, mx.float32, d_out=d_out)
            zeros = mx.zeros((sae.num_latents,), dtype=mx.int64)
            self.coders[name] = Coder(name, hook, seed, sae, make_optimizer(cfg.optimizer, sae),
                                      cfg.lr or cfg.default_lr(sae.num_latents), zeros, zeros)
        self.total_steps = cfg.total_steps(source.tokens_per_batch, source.batches_per_epoch)
        self.warmup = cfg.warmup_steps(self.total_steps)
        if saved:
            self._load_state(saved)
        for c in self.coders.values():
            mx.eval(c.sae.parameters(), c.opt.state)
            c.steps = StepFunctions(c.sae, c.opt, cfg.auxk_alpha, self.compile_mode)

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
                    c.fired = mx.zeros(c.tokens_since_fired.shape, dtype=mx.bool_)
                for _ in range(cfg.grad_acc_steps):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    self.batches += 1
                    for c in self.coders.values():
                        x, y = batch[c.hook]
                        self._check_finite(x, y, c.hook)
                        if self.step == 0 and step_tokens == 0:
                            c.sae.b_dec = y.astype(mx.float32).mean(0).astype(c.sae.b_dec.dtype)
                        self._forward_backward(c, x.astype(mx.float32), y.astype(mx.float32))
                    step_tokens += next(iter(batch.values()))[0].shape[0]
                if step_tokens == 0:  # the activation source ran out
                    break
                lr_scale = cfg.lr_at(self.step, 1.0, self.warmup, self.total_steps)
                for c in self.coders.values():
                    self._optimizer_step(c, c.lr * lr_scale, step_tokens)
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

    def _forward_backward(self, c: Coder, x: mx.array, y: mx.array) -> None:
        cfg = self.cfg
        dead_mask = c.tokens_since_fired >= cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        chunks = list(zip(_chunk(x, cfg.micro_acc_steps), _chunk(y, cfg.micro_acc_steps)))
        total_variance = mx.square(y - y.mean(0)).sum() if len(chunks) > 1 else None
        results = []
        for x_c, y_c in chunks:
            weight = mx.array(1.0 / cfg.grad_acc_steps, dtype=mx.float32)
            if total_variance is not None:  # renormalise this chunk by the whole batch's variance
                weight = weight * mx.stop_gradient(mx.square(y_c - y_c.mean(0)).sum() / total_variance)
            grads, metrics = c.steps.chunk(x_c, y_c, dead_mask, weight)
            c.grads = grads if c.grads is None else tree_map(mx.add, c.grads, grads)
            results.append((weight, metrics))
        mx.eval(c.grads, results)  # the batch's work, done where torch's eager backward would have done it
        for weight, (loss, fvu, auxk, multi, l0, counts) in results:
            if not math.isfinite(loss.item()):
                raise UserError(f"the loss of {c.name} became {loss.item()} at step {self.step}; nothing was "
                                f"saved after the last checkpoint. Lower --lr or check the activations")
            c.fired = c.fired | (counts > 0)
            c.fire_count = c.fire_count + counts.astype(mx.int64)
            for key, value in (("fvu", fvu), ("auxk", auxk), ("multi_topk_fvu", multi)):
                c.sums[key] = c.sums.get(key, 0.0) + value.item() * (weight.item() * cfg.grad_acc_steps)
            c.sums["l0"] = c.sums.get("l0", 0.0) + l0.item() / len(chunks)
        c.sums["batches"] = c.sums.get("batches", 0) + 1

    def _optimizer_step(self, c: Coder, lr: float, step_tokens: int) -> None:
        c.steps.update(c.grads, lr, self.step + 1)
        c.grads = None
        c.tokens_since_fired = mx.where(c.fired, mx.array(0, dtype=mx.int64), c.tokens_since_fired + step_tokens)
        mx.eval(c.sae.parameters(), c.opt.state, c.tokens_since_fired, c.fire_count)

    def _check_finite(self, x: mx.array, y: mx.array, hook: str) -> None:
        if not (bool(mx.isfinite(x).all()) and (y is x or bool(mx.isfinite(y).all()))):
            saved = f"the checkpoint of step {self._saved_step} is kept" if self._saved_step else "nothing was saved"
            raise UserError(f"non-finite activations (NaN or Inf) at step {self.step}, hookpoint {hook!r} "
                            f"(data batch {self.batches - 1}); training stopped and {saved}. "
                            f"Try --dtype float32, or exclude the offending tokens")

    # ------------------------------------------------------------------------------------------------------------
    # Logging, saving, loading
    # ------------------------------------------------------------------------------------------------------------

    _saved_step = 0

    def _log_record(self, lr_scale: float, tokens_per_s: float, elapsed: float) -> dict:
        record = {"step": self.step, "tokens": self.tokens,
                  "lr": next(iter(self.coders.values())).lr * lr_scale,
                  "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed, 2)}
        for name, c in self.coders.items():
            n = max(c.sums.get("batches", 0), 1)
            for key in ("fvu", "auxk", "multi_topk_fvu", "l0"):
                record[f"{key}/{name}"] = c.sums.get(key, 0.0) / n
            dead = c.tokens_since_fired >= self.cfg.dead_feature_threshold
            record[f"dead_pct/{name}"] = 100.0 * float(dead.astype(mx.float32).mean().item())
            c.fvu_since_save.append(record[f"fvu/{name}"])
            c.last = record
            c.sums = {}
        return record

    def _postfix(self, record: dict) -> str:
        parts = []
        for name in self.coders:
            label = f"{name} " if len(self.coders) > 1 else ""
            parts.append(f"{label}fvu={record[f'fvu/{name}']:.3f} dead={record[f'dead_pct/{name}']:.1f}%")
        return ", ".join(parts)

    def _progress_bar(self):
        from tqdm.auto import tqdm

        total = None if self.total_steps is None else \
            self.total_steps * self.source.tokens_per_batch * self.cfg.grad_acc_steps
        return tqdm(total=total, initial=self.step * self.source.tokens_per_batch * self.cfg.grad_acc_steps,
                    unit="tok", unit_scale=True, desc="Training", disable=not self.progress, dynamic_ncols=True,
                    file=sys.stderr)

    def run_state(self) -> dict:
        cfg = self.cfg
        return {
            "backend": BACKEND, "step": self.step, "batches": self.batches, "tokens": self.tokens,
            "total_steps": self.total_steps, "warmup_steps": self.warmup,
            "lr": {n: c.lr for n, c in self.coders.items()},
            "coders": {n: {"hookpoint": c.hook, "seed": c.seed, "d_in": c.sae.d_in, "d_out": c.sae.d_out,
                           "num_latents": c.sae.num_latents} for n, c in self.coders.items()},
            "best_fvu": self.best_fvu,
            "data": self.source.data_info,
            "rng": {"init_seeds": list(cfg.init_seeds), "data_seed": cfg.seed},
            "train_config": cfg.to_dict(),
            "elapsed_s": round(self.elapsed, 3),
        }

    def save(self) -> None:
        for c in self.coders.values():  # the saved SAE is the optimizer's evaluation point (schedule-free's x)
            c.opt.eval()
        try:
            self._save()
        finally:
            for c in self.coders.values():
                c.opt.train()

    def _save(self) -> None:
        if self.cfg.keep_best:
            self._save_best()
        staging = begin_save(self.run)
        for name, c in self.coders.items():
            folder = staging / name
            c.sae.save_to_disk(folder)
            tensors = {"tokens_since_fired": c.tokens_since_fired, "fire_count": c.fire_count,
                       **c.opt.state_tensors()}
            write_coder_state(folder, {k: to_numpy(v) for k, v in tensors.items()}, self.cfg.optimizer, self.step)
            debug_pause("write", self.step)
        write_run_state(staging, self.run_state())
        commit_save(self.run)
        self._saved_step = self.step
        for c in self.coders.values():
            c.fvu_since_save = []

    def _save_best(self) -> None:
        improved = {}
        for name, c in self.coders.items():
            if c.fvu_since_save:
                fvu = float(np.mean(c.fvu_since_save))
                if fvu < self.best_fvu.get(name, float("inf")):
                    improved[name] = fvu
        if not improved:
            return
        best = self.run / BEST_DIR
        staging = begin_save(best)
        for name in improved:
            self.coders[name].sae.save_to_disk(staging / name)
        commit_save(best)
        self.best_fvu.update(improved)

    def _load_state(self, saved: dict) -> None:
        self.step, self.batches, self.tokens = saved["step"], saved["batches"], saved["tokens"]
        self.elapsed, self.best_fvu = saved.get("elapsed_s", 0.0), dict(saved.get("best_fvu", {}))
        self._saved_step = self.step
        self.total_steps = self.cfg.total_steps(self.source.tokens_per_batch, self.source.batches_per_epoch)
        self.warmup = saved.get("warmup_steps", self.warmup) if self.cfg.lr_warmup_steps is None else self.warmup
        for name, c in self.coders.items():
            shapes = {p: tuple(t.shape) for p, t in c.opt.params.items()}
            tensors = read_coder_state(self.run / name, self.cfg.optimizer, shapes)
            c.opt.load_state_tensors(tensors)
            c.tokens_since_fired = mx.array(tensors["tokens_since_fired"].astype(np.int64))
            c.fire_count = mx.array(tensors["fire_count"].astype(np.int64))
            c.lr = saved.get("lr", {}).get(name, c.lr) if self.cfg.lr is None else c.lr

    def _finish(self, interrupted: bool) -> dict:
        coders = {}
        for name, c in self.coders.items():
            last = c.last
            stats = coder_stats(np.array(c.fire_count), np.array(c.tokens_since_fired),
                                self.cfg.dead_feature_threshold)
            coders[name] = {"fvu": last.get(f"fvu/{name}", float("nan")), "l0": last.get(f"l0/{name}", float("nan")),
                            **stats}
        plots = plot_run(self.run, {n: np.array(c.fire_count) for n, c in self.coders.items()},
                         self.tokens) if self.plots else []
        return {"run_dir": str(self.run), "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                "interrupted": interrupted, "coders": coders, "plots": [str(p) for p in plots]}


def _chunk(x: mx.array, chunks: int) -> list[mx.array]:
    """torch.chunk's split: pieces of ceil(N / chunks) rows (the last may be shorter, and there may be fewer)."""
    if chunks == 1:
        return [x]
    size = -(-x.shape[0] // chunks)
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


# ---------------------------------------------------------------------------------------------------------------
# Setup: config -> activation source -> run folder -> Trainer
# ---------------------------------------------------------------------------------------------------------------

def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "out of memory", "can't allocate memory", "attempting to allocate", "unable to allocate",
        "insufficient memory"))


def train(cfg: TrainConfig, source=None, *, resume: bool | str = False, explicit: set[str] | None = None,
          overwrite: bool = False, progress: bool = True, stop_after_steps: int | None = None,
          plots: bool = True, model_runner: str | None = None, compiled: bool | str | None = None) -> dict:
    """Train sparse coders as `cfg` says; returns {run_dir, step, tokens, elapsed_s, interrupted, coders, plots}.

    `source`: None (run cfg.model on cfg.dataset, or stream cfg.activations), or an iterable of
    {hookpoint: x | (x, y)} batches (NumPy/mx arrays or torch tensors). `resume`: True (the run folder named by
    cfg) or a run folder path. `explicit`: names of the config fields the user set (CLI), which a resume applies on
    top of the checkpoint's config; None compares the whole config. `stop_after_steps`: save and return (as if
    interrupted) once the run has done this many optimizer steps; resume it later. `plots`: write plots/*.png at
    the end. `model_runner`: auto, mlx-lm or torch (see
    sae_mlx.activations). `compiled`: what to `mx.compile` (see `compile_mode`).
    """
    cfg.validate()
    saved = None
    run = None
    if resume and (isinstance(resume, (str, Path)) or cfg.run_name):
        run = Path(resume) if isinstance(resume, (str, Path)) else Path(cfg.save_dir).expanduser() / cfg.run_name
        saved = read_run_state(run)
        if saved is None:
            raise UserError(f"nothing to resume: {run} holds no checkpoint")
        cfg = merge_resume_config(saved, cfg, explicit)
    device = resolve_device(cfg.device)
    make_source = tokenizer = None
    if source is not None and not hasattr(source, "batches"):
        source = ArrayActivationSource(source)
    if source is None and cfg.activations:
        source = CacheActivationSource(cfg.activations, cfg.batch_size * cfg.ctx_len, cfg.seed,
                                       cfg.hookpoints or None)
    if source is None:
        with mx.stream(device):
            hookpoints, make_source, tokenizer = load_model_source(cfg, choose_model_runner(model_runner))
    else:
        hookpoints = source.hookpoints
        if source.transcode != cfg.sae.transcode:
            raise UserError(f"the activations are for {'a transcoder' if source.transcode else 'an autoencoder'}"
                            f" but the config says transcode={cfg.sae.transcode}")
    if run is None:
        run = choose_run_dir(cfg.save_dir, cfg.run_name, cfg.model, hookpoints, bool(resume), overwrite)
        if resume:
            saved = read_run_state(run)
            cfg = merge_resume_config(saved, cfg, explicit)
    if make_source is not None:
        exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
        limit = cfg.max_tokens if saved is None else saved["data"].get("read_tokens", cfg.max_tokens)
        chunks = load_token_chunks(cfg.dataset, cfg.split, tokenizer, cfg.ctx_len, limit, cfg.text_column)
        with mx.stream(device):
            source = make_source(chunks, exclude)
        source.data_info["read_tokens"] = limit
    if saved is not None:
        check_same_run(saved, source, hookpoints)
    with mx.stream(device):
        trainer = Trainer(cfg, source, run, saved, device, progress, stop_after_steps, plots, compiled)
    if progress:
        what = ", ".join(f"{n} (d_in={c.sae.d_in}, M={c.sae.num_latents}, k={cfg.sae.k}, lr={c.lr:.2e})"
                         for n, c in trainer.coders.items())
        verb = f"Resuming at step {trainer.step}" if saved else "Training"
        steps = f"{trainer.total_steps} steps" if trainer.total_steps else "until the data ends"
        print(f"{verb}: {what}; {steps} of {source.tokens_per_batch * cfg.grad_acc_steps} tokens; "
              f"saving to {run}", file=sys.stderr, flush=True)
    try:
        with mx.stream(device):
            result = trainer.fit()
    except UserError:
        raise
    except Exception as e:
        if _is_oom(e):
            raise UserError(f"out of memory at step {trainer.step} ({type(e).__name__}): lower --batch_size, or "
                            f"keep it and split the work with --grad_acc_steps N (N batches per optimizer step) or "
                            f"--micro_acc_steps N (each batch in N chunks); the last checkpoint is intact") from None
        raise
    return result


__all__ = ["Trainer", "train"]
