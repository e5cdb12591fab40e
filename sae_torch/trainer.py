"""Training loop, torch side. The whole algorithm is `Trainer.fit` (one page); the rest is setup and bookkeeping.

Per optimizer step, for every coder (one per hookpoint and init seed), on grad_acc_steps batches {hook: (x, y)}:
    (first step of a fresh run: b_dec <- mean of the first batch's targets y)
    dead_mask = tokens_since_fired >= dead_feature_threshold          (only when auxk_alpha > 0)
    for each of micro_acc_steps chunks c of the batch:
        out  = sae(x_c, y_c, dead_mask=dead_mask)
        loss = (fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8) * TV_c / TV / grad_acc_steps
               (TV_c / TV: each chunk's terms are renormalised by the whole batch's total variance, so chunking
               leaves the loss unchanged)
        loss.backward()
        fired |= latents with activation > 0 in this chunk
    (normalize_decoder, autoencoders only, as sparsify: remove the W_dec gradient's component along each row)
    optimizer step with lr = TrainConfig.lr_at(step, base_lr, warmup, total_steps)      (sae_torch.optim: Signum or Adam)
    (normalize_decoder: renormalise W_dec rows to unit norm)
    tokens_since_fired += tokens of the step; tokens_since_fired[fired] = 0

The data position (batches consumed), optimizer moments, tokens_since_fired and step are saved every save_every
steps in the layout of sae_core.training_state, so `resume` continues bit for bit (same device and thread count).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Bitwise-reproducible CPU math: MKL otherwise picks code paths by memory alignment, and a resumed run (whose buffers
# are allocated differently) drifts from the uninterrupted one in the last bits. Read by MKL at its first call, so
# this must run before any CPU matmul of the process (sae_core.cli and the tests set it earlier); a user's own
# setting is kept. Measured cost: an SAE step (N=1024, M=18432) 0.42 s -> 0.45 s.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from sae_core.data import check_dataset, default_exclude_tokens, load_token_chunks
from sae_core.errors import UserError
from sae_core.metrics import MetricsLog, coder_stats, plot_run
from sae_core.train_config import TrainConfig
from sae_core.training_state import (BEST_DIR, SigintFlag, begin_save, check_same_run, choose_run_dir, coder_names,
                                     commit_save, debug_pause, merge_resume_config, read_coder_state,
                                     read_run_state, write_coder_state, write_run_state)

from .activations import (ArrayActivationSource, CacheActivationSource, ModelActivationSource, load_model,
                          resolve_device, resolve_dtype, resolve_hookpoints)
from .optim import Optimizer, make_optimizer
from .sparse_coder import SparseCoder

BACKEND = "torch"


@dataclass
class Coder:
    """One sparse coder in training, with its optimizer and firing statistics."""
    name: str
    hook: str
    seed: int
    sae: SparseCoder
    opt: Optimizer
    lr: float
    tokens_since_fired: Tensor  # [M] int64
    fire_count: Tensor  # [M] int64
    fired: Tensor = None  # [M] bool, this step
    sums: dict = field(default_factory=dict)  # metric sums since the last log line
    fvu_since_save: list = field(default_factory=list)  # logged FVUs since the last save (keep_best)
    last: dict = field(default_factory=dict)  # the last metrics record


class Trainer:
    def __init__(self, cfg: TrainConfig, source, run: Path, saved: dict | None, device: torch.device,
                 progress: bool = True, stop_after_steps: int | None = None, plots: bool = True):
        self.cfg, self.source, self.run, self.device, self.progress = cfg, source, run, device, progress
        self.stop_after_steps, self.plots = stop_after_steps, plots
        self.step = self.batches = self.tokens = 0
        self.elapsed = 0.0
        self.best_fvu: dict[str, float] = {}
        self.coders: dict[str, Coder] = {}
        for name, (hook, seed) in coder_names(source.hookpoints, cfg.init_seeds).items():
            d_in, d_out = source.widths[hook]
            if saved:
                sae = SparseCoder.load_from_disk(run / name, device, dtype=torch.float32)
            else:
                torch.manual_seed(seed)
                sae = SparseCoder(d_in, cfg.sae, device, dtype=torch.float32, d_out=d_out)
            zeros = torch.zeros(sae.num_latents, dtype=torch.int64, device=device)
            self.coders[name] = Coder(name, hook, seed, sae, make_optimizer(cfg.optimizer, sae),
                                      cfg.lr or cfg.default_lr(sae.num_latents), zeros.clone(), zeros.clone())
        self.total_steps = cfg.total_steps(source.tokens_per_batch, source.batches_per_epoch)
        self.warmup = cfg.warmup_steps(self.total_steps)
        if saved:
            self._load_state(saved)

    # ------------------------------------------------------------------------------------------------------------
    # The algorithm
    # ------------------------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        log = MetricsLog(self.run, resume_step=self.step if self.step else None)
        batches = self.source.batches(start=self.batches)
        bar = self._progress_bar()
        stop = SigintFlag()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        start, window_start, window_tokens = time.perf_counter() - self.elapsed, time.perf_counter(), 0
        last_saved, lr_scale = self.step, 1.0
        with stop:
            while self.total_steps is None or self.step < self.total_steps:
                step_tokens = 0
                for c in self.coders.values():
                    c.fired = torch.zeros_like(c.tokens_since_fired, dtype=torch.bool)
                for _ in range(cfg.grad_acc_steps):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    self.batches += 1
                    for c in self.coders.values():
                        x, y = batch[c.hook]
                        self._check_finite(x, y, c.hook)
                        if self.step == 0 and step_tokens == 0:
                            c.sae.b_dec.data = y.float().mean(0).to(c.sae.b_dec.dtype)
                        with autocast:
                            self._forward_backward(c, x.float(), y.float())
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

    def _forward_backward(self, c: Coder, x: Tensor, y: Tensor) -> None:
        cfg = self.cfg
        dead_mask = c.tokens_since_fired >= cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        chunks = list(zip(x.chunk(cfg.micro_acc_steps), y.chunk(cfg.micro_acc_steps)))
        total_variance = (y - y.mean(0)).pow(2).sum() if len(chunks) > 1 else None
        for x_c, y_c in chunks:
            out = c.sae(x_c, y_c, dead_mask=dead_mask)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            weight = 1.0 / cfg.grad_acc_steps
            if total_variance is not None:  # renormalise this chunk by the whole batch's variance
                weight = weight * ((y_c - y_c.mean(0)).pow(2).sum() / total_variance).detach()
            if not torch.isfinite(loss):
                raise UserError(f"the loss of {c.name} became {loss.item()} at step {self.step}; nothing was "
                                f"saved after the last checkpoint. Lower --lr or check the activations")
            (loss * weight).backward()
            active = out.latent_acts > 0
            fired_idx = out.latent_indices[active]
            c.fired[fired_idx] = True
            c.fire_count += torch.bincount(fired_idx, minlength=c.sae.num_latents)
            for key, value in (("fvu", out.fvu), ("auxk", out.auxk_loss), ("multi_topk_fvu", out.multi_topk_fvu)):
                c.sums[key] = c.sums.get(key, 0.0) + float(value.detach()) * (float(weight) * cfg.grad_acc_steps)
            c.sums["l0"] = c.sums.get("l0", 0.0) + float(active.sum(-1).float().mean()) / len(chunks)
        c.sums["batches"] = c.sums.get("batches", 0) + 1

    def _optimizer_step(self, c: Coder, lr: float, step_tokens: int) -> None:
        sae = c.sae
        normalize = sae.cfg.normalize_decoder and not sae.cfg.transcode
        if normalize and sae.W_dec.grad is not None:
            sae.remove_gradient_parallel_to_decoder_directions()
        c.opt.step(lr, self.step + 1)
        c.opt.zero_grad()
        if normalize:
            sae.set_decoder_norm_to_unit_norm()
        c.tokens_since_fired += step_tokens
        c.tokens_since_fired[c.fired] = 0

    def _check_finite(self, x: Tensor, y: Tensor, hook: str) -> None:
        if not (bool(torch.isfinite(x).all()) and (y is x or bool(torch.isfinite(y).all()))):
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
            record[f"dead_pct/{name}"] = 100.0 * float(dead.float().mean())
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
            write_coder_state(folder, {k: v.detach().cpu().numpy() for k, v in tensors.items()},
                              self.cfg.optimizer, self.step)
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
            shapes = {p: tuple(t.shape) for p, t in c.sae.named_parameters()}
            tensors = read_coder_state(self.run / name, self.cfg.optimizer, shapes)
            c.opt.load_state_tensors({k: torch.from_numpy(v) for k, v in tensors.items()})
            c.tokens_since_fired.copy_(torch.from_numpy(tensors["tokens_since_fired"]))
            c.fire_count.copy_(torch.from_numpy(tensors["fire_count"]))
            c.lr = saved.get("lr", {}).get(name, c.lr) if self.cfg.lr is None else c.lr

    def _finish(self, interrupted: bool) -> dict:
        coders = {}
        for name, c in self.coders.items():
            last = c.last
            stats = coder_stats(c.fire_count.cpu().numpy(), c.tokens_since_fired.cpu().numpy(),
                                self.cfg.dead_feature_threshold)
            coders[name] = {"fvu": last.get(f"fvu/{name}", float("nan")), "l0": last.get(f"l0/{name}", float("nan")),
                            **stats}
        plots = plot_run(self.run, {n: c.fire_count.cpu().numpy() for n, c in self.coders.items()},
                         self.tokens) if self.plots else []
        return {"run_dir": str(self.run), "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                "interrupted": interrupted, "coders": coders, "plots": [str(p) for p in plots]}


# ---------------------------------------------------------------------------------------------------------------
# Setup: config -> activation source -> run folder -> Trainer
# ---------------------------------------------------------------------------------------------------------------

def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def train(cfg: TrainConfig, source=None, *, resume: bool | str = False, explicit: set[str] | None = None,
          overwrite: bool = False, progress: bool = True, stop_after_steps: int | None = None,
          plots: bool = True) -> dict:
    """Train sparse coders as `cfg` says; returns {run_dir, step, tokens, elapsed_s, interrupted, coders, plots}.

    `source`: None (run cfg.model on cfg.dataset, or stream cfg.activations), or an iterable of
    {hookpoint: x | (x, y)} batches (arrays or tensors). `resume`: True (the run folder named by cfg) or a run
    folder path. `explicit`: names of the config fields the user set (CLI), which a resume applies on top of the
    checkpoint's config; None compares the whole config. `stop_after_steps`: save and return (as if interrupted)
    once the run has done this many optimizer steps; resume it later. `plots`: write plots/*.png at the end.
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
    model = tokenizer = None
    if source is not None and not hasattr(source, "batches"):
        source = ArrayActivationSource(source, device)
    if source is None and cfg.activations:
        source = CacheActivationSource(cfg.activations, cfg.batch_size * cfg.ctx_len, cfg.seed, device,
                                       cfg.hookpoints or None)
    if source is None:
        check_dataset(cfg.dataset)  # before the (slow) model load
        model, tokenizer = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
        hookpoints = resolve_hookpoints(model, cfg.hookpoints, cfg.layers, cfg.layer_stride)
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
    if model is not None:
        exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
        limit = cfg.max_tokens if saved is None else saved["data"].get("read_tokens", cfg.max_tokens)
        chunks = load_token_chunks(cfg.dataset, cfg.split, tokenizer, cfg.ctx_len, limit, cfg.text_column)
        source = ModelActivationSource(model, hookpoints, chunks, cfg.batch_size, cfg.seed, cfg.sae.transcode,
                                       exclude)
        source.data_info["read_tokens"] = limit
    if saved is not None:
        check_same_run(saved, source, hookpoints)
    trainer = Trainer(cfg, source, run, saved, device, progress, stop_after_steps, plots)
    if progress:
        what = ", ".join(f"{n} (d_in={c.sae.d_in}, M={c.sae.num_latents}, k={cfg.sae.k}, lr={c.lr:.2e})"
                         for n, c in trainer.coders.items())
        verb = f"Resuming at step {trainer.step}" if saved else "Training"
        steps = f"{trainer.total_steps} steps" if trainer.total_steps else "until the data ends"
        print(f"{verb}: {what}; {steps} of {source.tokens_per_batch * cfg.grad_acc_steps} tokens; "
              f"saving to {run}", file=sys.stderr, flush=True)
    try:
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
