"""Distributed training, MLX side: data parallel over `mx.distributed` (ring over TCP; MPI where present).

Launch with mlx.launch (one process per Mac, or several on one machine):

    mlx.launch --hosts mac1,mac2 -- python -m sae_mlx.distributed train --hookpoints layers.6 ...
    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- python -m sae_mlx.distributed train ...   (one machine)

The same scheme as sae_torch.distributed (read it for the details): every rank walks the global batch order and
takes its contiguous slice of each global batch; its loss is weighted by TV_rank / TV_global; the gradients are
summed with `mx.distributed.all_sum` (so their sum is the 1-rank gradient on the global batch); the firing
statistics, the tokens of a step, the first batch's mean (b_dec) and the logged metrics are summed too. Rank 0
alone writes the checkpoint, in the 1-rank layout, so a run resumes at any world size and on either backend.
`distribute_modules` is torch-only for now.

A rank that dies: MLX's ring backend may wait for it forever, so every collective runs under a watchdog. If one
has not returned after `SAE_DIST_TIMEOUT` seconds (default 600), the process prints which collective stalled and
exits with status 1. Test hook: `SAE_DEBUG_DIE="<rank>:<step>[:hang]"` makes that rank exit(1) (or sleep) before
that step.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from sae_core.data import token_batches
from sae_core.errors import UserError
from sae_core.metrics import coder_stats

from . import trainer as _trainer
from .trainer import Trainer, _chunk

DEFAULT_TIMEOUT_S = 600
PATH_BYTES = 4096


class Group:
    """The distributed group and a watchdog that ends the process when a collective stalls."""

    def __init__(self, group, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self.rank, self.size = group.rank(), group.size()
        self._since: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True, name="sae-dist-watchdog").start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                since, what = self._since, self._what
            if since is not None and time.monotonic() - since > self.timeout_s:
                print(f"error: rank {self.rank}: {what} got no answer from the other ranks in {self.timeout_s:g} s "
                      f"(another rank stopped or died; its own error is above); stopping", file=sys.stderr,
                      flush=True)
                os._exit(1)

    def all_sum(self, x: mx.array, what: str) -> mx.array:
        with self._lock:
            self._since, self._what = time.monotonic(), what
        try:
            out = mx.distributed.all_sum(x, group=self.group)
            mx.eval(out)
        except RuntimeError as e:
            raise UserError(f"rank {self.rank}: lost the other ranks during {what} (another rank stopped or died; "
                            f"its own error is above): {str(e).splitlines()[0]}") from None
        finally:
            with self._lock:
                self._since = None
        return out

    def barrier(self, what: str) -> None:
        self.all_sum(mx.array([1.0]), what)

    def broadcast_text(self, text: str | None, what: str) -> str:
        """Rank 0's string, on every rank."""
        data = np.zeros(PATH_BYTES, dtype=np.int32)
        if self.rank == 0:
            raw = np.frombuffer(text.encode(), dtype=np.uint8)
            if len(raw) >= PATH_BYTES:
                raise UserError(f"{what}: text too long to share ({len(raw)} bytes)")
            data[:len(raw)] = raw
        out = np.array(self.all_sum(mx.array(data), what)).astype(np.uint8)
        return out[:np.argmin(out) if (out == 0).any() else len(out)].tobytes().decode()


_GROUP: Group | None = None


def init(timeout_s: float | None = None) -> Group | None:
    """Join the group mlx.launch describes (MLX_RANK/MLX_HOSTFILE for ring, or MPI); None when alone."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    if group.size() <= 1:
        return None
    timeout_s = float(os.environ.get("SAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    _GROUP = Group(group, timeout_s)
    return _GROUP


class ShardedSource:
    """Same global batch order and position, each rank gets its contiguous slice (a language-model source is
    sliced by sequences before the model runs)."""

    def __init__(self, source, rank: int, world: int):
        self._source, self.rank, self.world = source, rank, world
        self.first_mean: dict[str, mx.array] = {}  # {hook: mean of the first global batch's y}, when every rank has it

    def __getattr__(self, name):
        return getattr(self._source, name)

    def _bounds(self, n: int) -> tuple[int, int]:
        cuts = np.linspace(0, n, self.world + 1).round().astype(int)
        return int(cuts[self.rank]), int(cuts[self.rank + 1])

    def batches(self, start: int = 0):
        src = self._source
        if getattr(src, "kind", None) == "model":
            inner = getattr(src, "inner", src)  # TorchModelActivationSource keeps the chunks in the torch source
            for tokens in token_batches(inner.chunks, inner.batch_size, inner.seed, start):
                lo, hi = self._bounds(len(tokens))
                yield src.activations(tokens[lo:hi])
            return
        for number, batch in enumerate(src.batches(start=start), start):
            out = {}
            for hook, (x, y) in batch.items():
                if number == 0:  # b_dec's initial value, computed exactly as a 1-rank run does
                    self.first_mean[hook] = y.astype(mx.float32).mean(0)
                lo, hi = self._bounds(x.shape[0])
                out[hook] = (x[lo:hi], x[lo:hi] if y is x else y[lo:hi])
            yield out


class DistributedTrainer(Trainer):
    """sae_mlx.trainer.Trainer with data parallelism's collectives around its steps; Trainer.fit unchanged."""

    def __init__(self, cfg, source, run, saved, device=None, progress=True, *args, **kwargs):
        self.g = _GROUP
        self.rank, self.world = self.g.rank, self.g.size
        super().__init__(cfg, ShardedSource(source, self.rank, self.world), run, saved, device,
                         progress and self.rank == 0, *args, **kwargs)
        self.shared_run = Path(run)
        self._scratch = None
        if self.rank != 0:
            self._scratch = Path(tempfile.mkdtemp(prefix=f"sae-mlx-rank{self.rank}-"))
            self.run = self._scratch
        self._die = os.environ.get("SAE_DEBUG_DIE")
        for c in self.coders.values():  # identical start on every rank: rank 0's parameters
            params = c.opt.params
            for name, p in params.items():
                summed = self.g.all_sum(p if self.rank == 0 else mx.zeros_like(p), "the initial broadcast")
                c.sae.update(tree_unflatten([(name, summed)]))
            mx.eval(c.sae.parameters())
        self._bdec_global: set[str] = set()
        self._tokens_step = -1
        self._global_tokens = 0

    def _forward_backward(self, c, x, y) -> None:
        cfg, g = self.cfg, self.g
        pack = mx.concatenate([mx.array([y.shape[0]], dtype=mx.float32), y.sum(0)])
        pack = g.all_sum(pack, "the batch-mean all-reduce")
        mean = pack[1:] / pack[0]
        if self.step == 0 and c.name not in self._bdec_global:  # fit set the local mean; use the global one
            mean_0 = self.source.first_mean.get(c.hook, mean)
            c.sae.b_dec = mean_0.astype(c.sae.b_dec.dtype)
            self._bdec_global.add(c.name)
        total_variance = g.all_sum(mx.square(y - mean).sum().reshape(1), "the total-variance all-reduce")[0]
        if getattr(c, "fire_delta", None) is None:
            c.fire_delta = mx.zeros(c.fire_count.shape, dtype=mx.int64)
        dead_mask = c.tokens_since_fired >= cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        chunks = list(zip(_chunk(x, cfg.micro_acc_steps), _chunk(y, cfg.micro_acc_steps)))
        results = []
        for x_c, y_c in chunks:
            # this rank's chunk renormalised by the global batch's variance: the summed gradients are the 1-rank's
            weight = mx.stop_gradient(mx.square(y_c - y_c.mean(0)).sum() / total_variance) / cfg.grad_acc_steps
            grads, metrics = c.steps.chunk(x_c, y_c, dead_mask, weight.astype(mx.float32))
            c.grads = grads if c.grads is None else tree_map(mx.add, c.grads, grads)
            results.append((weight, metrics))
        mx.eval(c.grads, results)
        for weight, (loss, fvu, auxk, multi, l0, counts) in results:
            if not np.isfinite(loss.item()):
                raise UserError(f"the loss of {c.name} became {loss.item()} at step {self.step} on rank "
                                f"{self.rank}; nothing was saved after the last checkpoint. Lower --lr or check "
                                f"the activations")
            c.fired = c.fired | (counts > 0)
            c.fire_delta = c.fire_delta + counts.astype(mx.int64)
            for key, value in (("fvu", fvu), ("auxk", auxk), ("multi_topk_fvu", multi)):
                c.sums[key] = c.sums.get(key, 0.0) + value.item() * (weight.item() * cfg.grad_acc_steps)
            c.sums["l0"] = c.sums.get("l0", 0.0) + l0.item() / len(chunks) / self.world
        c.sums["batches"] = c.sums.get("batches", 0) + 1

    def _optimizer_step(self, c, lr: float, step_tokens: int) -> None:
        if self._die and self._die.split(":")[:2] == [str(self.rank), str(self.step)]:
            if self._die.endswith(":hang"):
                print(f"rank {self.rank}: hanging at step {self.step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
                time.sleep(3600)
            print(f"rank {self.rank}: dying at step {self.step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
            os._exit(1)
        g = self.g
        if self._tokens_step != self.step:
            t = g.all_sum(mx.array([step_tokens], dtype=mx.int32), "the token-count all-reduce")
            self._global_tokens, self._tokens_step = int(t.item()), self.step
            self.tokens += self._global_tokens - step_tokens  # fit adds this rank's step_tokens after the step
        names = sorted(k for k, v in c.grads.items() if v is not None)
        flat = mx.concatenate([c.grads[k].reshape(-1) for k in names])
        flat = g.all_sum(flat, "the gradient all-reduce")
        offset = 0
        for k in names:
            size = c.grads[k].size
            c.grads[k] = flat[offset:offset + size].reshape(c.grads[k].shape)
            offset += size
        m = c.fire_count.shape[0]
        stats = g.all_sum(mx.concatenate([c.fired.astype(mx.int32), c.fire_delta.astype(mx.int32)]),
                          "the firing-statistics all-reduce")
        c.fired = stats[:m] > 0
        c.fire_count = c.fire_count + stats[m:].astype(mx.int64)
        c.fire_delta = None
        super()._optimizer_step(c, lr, self._global_tokens)

    def _log_record(self, lr_scale: float, tokens_per_s: float, elapsed: float) -> dict:
        keys = ("fvu", "auxk", "multi_topk_fvu", "l0")
        for c in self.coders.values():
            v = self.g.all_sum(mx.array([c.sums.get(k, 0.0) for k in keys], dtype=mx.float32), "the metrics all-reduce")
            c.sums.update({k: float(x) for k, x in zip(keys, np.array(v))})
        return super()._log_record(lr_scale, tokens_per_s * self.world, elapsed)

    def save(self) -> None:
        if self.rank == 0:
            run, self.run = self.run, self.shared_run
            try:
                super().save()
            finally:
                self.run = run
        else:
            self._saved_step = self.step
            for c in self.coders.values():
                c.fvu_since_save = []
        self.g.barrier("the checkpoint barrier")

    def _finish(self, interrupted: bool) -> dict:
        if self.rank == 0:
            result = super()._finish(interrupted)
        else:
            coders = {n: {"fvu": c.last.get(f"fvu/{n}", float("nan")), "l0": c.last.get(f"l0/{n}", float("nan")),
                          **coder_stats(np.array(c.fire_count), np.array(c.tokens_since_fired),
                                        self.cfg.dead_feature_threshold)} for n, c in self.coders.items()}
            result = {"run_dir": str(self.shared_run), "step": self.step, "tokens": self.tokens,
                      "elapsed_s": self.elapsed, "interrupted": interrupted, "coders": coders, "plots": []}
            shutil.rmtree(self._scratch, ignore_errors=True)
        result["run_dir"] = str(self.shared_run)
        result["rank"], result["world_size"] = self.rank, self.world
        return result


@contextlib.contextmanager
def _distributed_trainer_module(g: Group):
    saved = {name: getattr(_trainer, name) for name in ("Trainer", "choose_run_dir", "read_run_state")}

    def choose_run_dir(*args, **kwargs):
        answer = ""
        if g.rank == 0:
            try:
                answer = "ok:" + str(saved["choose_run_dir"](*args, **kwargs))
            except UserError as e:
                answer = "error:" + str(e)[:PATH_BYTES - 100]
        answer = g.broadcast_text(answer, "choosing the run folder")
        if answer.startswith("error:"):
            raise UserError(answer[len("error:"):])
        return Path(answer[len("ok:"):])

    def read_run_state(run):
        if g.rank == 0:
            state = saved["read_run_state"](run)  # recovers an interrupted save first
            g.barrier("reading the checkpoint")
            return state
        g.barrier("reading the checkpoint")
        return saved["read_run_state"](run)

    _trainer.Trainer, _trainer.choose_run_dir, _trainer.read_run_state = \
        DistributedTrainer, choose_run_dir, read_run_state
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_trainer, name, value)


def train(cfg, source=None, **kwargs) -> dict:
    """sae_mlx.trainer.train, data parallel when launched by mlx.launch with several processes; plain otherwise."""
    if cfg.distribute_modules:
        raise UserError("distribute_modules is implemented by the torch backend only (torchrun); the MLX backend "
                        "trains data parallel")
    g = init()
    if g is None:
        return _trainer.train(cfg, source, **kwargs)
    if g.rank != 0:
        kwargs["progress"] = False
    with _distributed_trainer_module(g):
        result = _trainer.train(cfg, source, **kwargs)
    g.barrier("the final barrier")
    return result


def main(argv: list[str] | None = None) -> int:
    """`mlx.launch ... -- python -m sae_mlx.distributed train ...`: the `sae` command, MLX backend, data parallel.
    Only rank 0 prints the summary."""
    from sae_core import cli

    class _Backend:
        @staticmethod
        def train(cfg, **kw):
            result = train(cfg, **kw)
            if result.get("rank", 0) != 0:
                sys.stdout = open(os.devnull, "w")
            return result

    original = cli.backend_module
    cli.backend_module = lambda backend, part: _Backend if part == "trainer" else original(backend, part)
    try:
        return cli.main(argv, default_backend="mlx")
    finally:
        cli.backend_module = original


if __name__ == "__main__":
    sys.exit(main())
