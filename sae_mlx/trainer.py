"""Training, MLX side: the adapter that runs sae_core.loop (the algorithm, once for both backends) with MLX.

Differences forced by MLX:

* Gradients are values: each chunk's gradient tree is added into `Coder.grads`, which the optimizer step
  consumes (torch accumulates into `.grad`). A batch's work is evaluated (`mx.eval`) at the end of each batch,
  where torch's eager execution would have computed it anyway.
* Compilation (`SAE_MLX_COMPILE`, see `compile_mode`): off by default (measured no faster on Linux CPU).
  `update` compiles the optimizer update (decoder-gradient projection, Signum/Adam, renormalisation) with
  `inputs/outputs = [coder.state, opt.state]`; `all` compiles each chunk's forward+backward too: the dead_mask is
  an input of the compiled function, so one graph serves every number of dead latents (the coder's fixed-size
  AuxK, see sae_mlx.sparse_coder), and steps where no latent is dead use a second graph without AuxK. Every mode
  computes the eager path's math, which mirrors torch operation for operation.
* `device`: auto (MLX's default device: the GPU on Apple silicon), cpu, gpu. The language model runs in mlx-lm or
  (when installed) torch's transformers runner: `model_runner`, see sae_mlx.activations.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from sae_core import loop
from sae_core.errors import UserError
from sae_core.loop import Coder, total_loss
from sae_core.train_config import TrainConfig

from .activations import (ArrayActivationSource, CacheActivationSource, choose_model_runner, convert_batch,
                          resolve_device, to_numpy)
from .optim import Optimizer, flat_grads, make_optimizer
from .sparse_coder import SparseCoder

COMPILE_MODES = ("off", "update", "all")


def compile_mode(compiled: bool | str | None = None) -> str:
    """What is `mx.compile`d: "off" (nothing; the default), "update" (the optimizer update with the decoder
    projection and renormalisation), "all" (also each chunk's forward+backward). `compiled`: True = "all",
    False = "off", a mode name, or None = $SAE_MLX_COMPILE (0/1 or a mode name), else "off".

    Nothing is compiled by default: on the CPU compiling did not pay (the compiled forward+backward uses a
    fixed-size AuxK; the update is 1-2% of a step); the figures are in bench/README.md, "MLX on Linux". Every mode
    computes the same run (tests/test_train_mlx.py); on Apple silicon, where fusing matters more, measure
    `SAE_MLX_COMPILE=update` and `=all`."""
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
            loss = total_loss(out.fvu, out.auxk_loss, out.multi_topk_fvu, auxk_alpha)
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


class MlxBackend:
    """sae_core.loop.Backend for MLX (read it there); `compiled`: see `compile_mode`."""
    name = "mlx"

    def __init__(self, device: mx.Device | None = None, compiled: bool | str | None = None,
                 model_runner: str | None = None):
        self.device, self.compile_mode, self._runner = device, compile_mode(compiled), model_runner

    def scope(self):
        return mx.stream(self.device if self.device is not None else mx.default_device())

    def new_coder(self, d_in, d_out, cfg, seed):
        mx.random.seed(seed)
        return SparseCoder(d_in, cfg, dtype=mx.float32, d_out=d_out)

    def load_coder(self, folder):
        return SparseCoder.load_from_disk(folder, dtype=mx.float32)

    def make_optimizer(self, name, sae, average_power):
        return make_optimizer(name, sae, average_power)

    def prepare(self, c: Coder, cfg: TrainConfig) -> None:
        mx.eval(c.sae.parameters(), c.opt.state)
        c.steps = StepFunctions(c.sae, c.opt, cfg.auxk_alpha, self.compile_mode)

    def counters(self, m):
        return mx.zeros((m,), dtype=mx.int64)

    def to_numpy(self, array) -> np.ndarray:
        return to_numpy(array)

    def from_numpy(self, array):
        return mx.array(array)

    def param_shapes(self, sae):
        return {p: tuple(t.shape) for p, t in _flat(sae.trainable_parameters()).items()}

    def all_finite(self, x, y) -> bool:
        return bool(mx.isfinite(x).all()) and (y is x or bool(mx.isfinite(y).all()))

    def mean(self, y):
        return y.astype(mx.float32).mean(0)

    def set_b_dec(self, sae, mean) -> None:
        sae.b_dec = mean.astype(sae.b_dec.dtype)

    def chunk(self, x, n):
        """torch.chunk's split: pieces of ceil(N / n) rows (the last may be shorter, and there may be fewer)."""
        if n == 1:
            return [x]
        size = -(-x.shape[0] // n)
        return [x[i:i + size] for i in range(0, x.shape[0], size)]

    def total_variance(self, y):
        y = y.astype(mx.float32)
        return mx.square(y - y.mean(0)).sum()

    def forward_backward(self, c, xs, ys, dead_mask, weights, auxk_alpha):
        results = []
        for x_c, y_c, weight in zip(xs, ys, weights):
            weight = weight.astype(mx.float32) if isinstance(weight, mx.array) else mx.array(weight, mx.float32)
            grads, metrics = c.steps.chunk(x_c.astype(mx.float32), y_c.astype(mx.float32), dead_mask, weight)
            c.grads = grads if c.grads is None else tree_map(mx.add, c.grads, grads)
            results.append(metrics)
        mx.eval(c.grads, results)  # the batch's work, done where torch's eager backward would have done it
        return [(loss.item(), fvu.item(), auxk.item(), multi.item(), l0.item(), counts.astype(mx.int64))
                for loss, fvu, auxk, multi, l0, counts in results]

    def optimizer_step(self, c, lr, t, step_tokens) -> None:
        c.steps.update(c.grads, lr, t)
        c.grads = None
        c.fire_count = c.fire_count + c.fire_delta
        c.tokens_since_fired = mx.where(c.fired, mx.array(0, dtype=mx.int64), c.tokens_since_fired + step_tokens)
        mx.eval(c.sae.parameters(), c.opt.state, c.tokens_since_fired, c.fire_count)

    # ---- data parallel (sae_mlx.distributed) ----

    def global_stats(self, y, comms):
        y = y.astype(mx.float32)
        pack = comms.all_sum(mx.concatenate([mx.array([y.shape[0]], dtype=mx.float32), y.sum(0)]),
                             "the batch-mean all-reduce")
        mean = pack[1:] / pack[0]
        return mean, comms.all_sum(mx.square(y - mean).sum().reshape(1), "the total-variance all-reduce")[0]

    def all_sum_step(self, c, comms) -> None:
        names = sorted(k for k, v in c.grads.items() if v is not None)
        flat = comms.all_sum(mx.concatenate([c.grads[k].reshape(-1) for k in names]), "the gradient all-reduce")
        offset = 0
        for k in names:
            size = c.grads[k].size
            c.grads[k] = flat[offset:offset + size].reshape(c.grads[k].shape)
            offset += size
        m = c.fire_count.shape[0]
        stats = comms.all_sum(mx.concatenate([c.fired.astype(mx.int32), c.fire_delta.astype(mx.int32)]),
                              "the firing-statistics all-reduce")
        c.fired, c.fire_delta = stats[:m] > 0, stats[m:].astype(mx.int64)

    def broadcast_coder(self, sae, comms) -> None:
        for name, p in _flat(sae.trainable_parameters()).items():
            summed = comms.all_sum(p if comms.rank == 0 else mx.zeros_like(p), "the initial broadcast")
            sae.update(tree_unflatten([(name, summed)]))
        mx.eval(sae.parameters())

    # ---- setup ----

    def is_oom(self, e: BaseException) -> bool:
        if isinstance(e, MemoryError):
            return True
        text = str(e).lower()
        return isinstance(e, RuntimeError) and any(s in text for s in (
            "out of memory", "can't allocate memory", "attempting to allocate", "unable to allocate",
            "insufficient memory"))

    def array_source(self, batches):
        return ArrayActivationSource(batches)

    def cache_source(self, folder, batch_tokens, seed, hookpoints):
        return CacheActivationSource(folder, batch_tokens, seed, hookpoints)

    def model_runner(self, cfg: TrainConfig) -> str:
        return {"mlx-lm": "mlx", "torch": "torch"}[choose_model_runner(self._runner)]

    def convert_batch(self, batch: dict) -> dict:
        return convert_batch(batch)


def _flat(tree) -> dict:
    return dict(tree_flatten(tree))


class Trainer(loop.Loop):
    """sae_core.loop.Loop on MLX: `Trainer(cfg, source, run, saved, device).fit()` (inside `mx.stream(device)`)."""

    def __init__(self, cfg: TrainConfig, source, run: Path, saved: dict | None, device: mx.Device | None = None,
                 progress: bool = True, stop_after_steps: int | None = None, plots: bool = True,
                 compiled: bool | str | None = None, *, comms=None, backend: MlxBackend | None = None):
        super().__init__(cfg, source, run, saved, backend or MlxBackend(device, compiled), progress=progress,
                         stop_after_steps=stop_after_steps, plots=plots, comms=comms)


def train(cfg: TrainConfig, source=None, *, resume: bool | str = False, explicit: set[str] | None = None,
          overwrite: bool = False, progress: bool = True, stop_after_steps: int | None = None,
          plots: bool = True, model_runner: str | None = None, compiled: bool | str | None = None,
          comms=None) -> dict:
    """Train sparse coders as `cfg` says; returns {run_dir, step, tokens, elapsed_s, interrupted, coders, plots}.

    `source`: None (run cfg.model on cfg.dataset, or stream cfg.activations), or an iterable of
    {hookpoint: x | (x, y)} batches (NumPy/mx arrays or torch tensors). `resume`: True (the run folder named by
    cfg) or a run folder path. `explicit`: names of the config fields the user set (CLI), which a resume applies on
    top of the checkpoint's config; None compares the whole config. `stop_after_steps`: save and return (as if
    interrupted) once the run has done this many optimizer steps; resume it later. `plots`: write plots/*.png at
    the end. `model_runner`: auto, mlx-lm or torch (see sae_mlx.activations). `compiled`: what to `mx.compile`
    (see `compile_mode`). `comms`: the ranks of a distributed run (sae_mlx.distributed); default one process.
    """
    return loop.train(cfg, lambda c: MlxBackend(resolve_device(c.device), compiled, model_runner),
                      lambda *a, backend, **kw: Trainer(*a, backend=backend, **kw), source, resume=resume,
                      explicit=explicit, overwrite=overwrite, progress=progress, stop_after_steps=stop_after_steps,
                      plots=plots, comms=comms)


__all__ = ["MlxBackend", "Trainer", "compile_mode", "train"]
