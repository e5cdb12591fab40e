"""Distributed training, torch side: data parallel (the default) or `--distribute_modules` (sparsify's name).

Launch with torchrun (NCCL on CUDA, gloo on CPU):

    torchrun --nproc_per_node=N -m sae_torch.distributed train --hookpoints layers.6 ...
    torchrun --nproc_per_node=N -m sae_torch.distributed train --distribute_modules --layers 0 1 2 3 ...

**Data parallel.** Every rank walks the same global batch order (sae_core.data) and takes its contiguous slice of
each global batch (sequences for a language model, rows for an activation cache or arrays). Each rank's loss is
weighted by TV_rank / TV_global (the global batch's total variance, from all-reduced sums), so that the all-reduced
SUM of the ranks' gradients is the gradient of the 1-rank loss on the global batch -- the same renormalisation the
trainer uses for micro_acc_steps chunks. No DDP wrapper: one explicit all-reduce of a flat gradient buffer per coder
and optimizer step (the same effect; and gloo's exit abort with a live DDP wrapper does not arise). The firing
statistics (which latents fired, fire counts, tokens of the step) are all-reduced before the dead-latent update, the
first batch's b_dec initialisation uses the global mean, and the logged metrics are global. The checkpoint is the
1-rank layout (sae_core.training_state), written by rank 0 only; the data position is the global batch number, so a
run resumes at any world size (save at 2 ranks, resume at 1, or the reverse).

**distribute_modules.** The coders (one per hookpoint and seed) are split over the ranks in contiguous groups of
hookpoints (numpy.array_split, as sparsify); each rank trains its own coders on the full global batches exactly as a
1-rank run would, with no communication during steps. A save writes one checkpoint: rank 0 opens the staging
folder, each owner writes its coders into it, rank 0 writes state.json (all coders) and publishes it atomically.

A rank that dies or raises makes the others fail at their next collective with an error naming the collective
(gloo notices a closed connection at once; a silent hang is bounded by `SAE_DIST_TIMEOUT` seconds, default 600).
Test hook: `SAE_DEBUG_DIE="<rank>:<step>[:hang]"` makes that rank exit(1) (or sleep) before that optimizer
step.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sae_core.data import token_batches
from sae_core.errors import UserError
from sae_core.metrics import coder_stats
from sae_core.training_state import begin_save, commit_save, debug_pause, write_coder_state, write_run_state

from . import trainer as _trainer
from .trainer import Trainer

DEFAULT_TIMEOUT_S = 600


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(timeout_s: float | None = None) -> bool:
    """Join the process group that torchrun (or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) describes. Returns True
    when this call created it. NCCL when CUDA is available, else gloo."""
    if dist.is_initialized() or env_world_size() <= 1:
        return False
    timeout_s = float(os.environ.get("SAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Barrier, then destroy the group (without the barrier, gloo aborts at exit in about a quarter of runs)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
        raise UserError(f"rank {dist.get_rank()}: lost the other ranks during {what} (another rank stopped or "
                        f"died; its own error is above): {str(e).splitlines()[0]}") from None


def all_reduce_(tensor: torch.Tensor, what: str) -> torch.Tensor:
    _collective(what, dist.all_reduce, tensor)
    return tensor


def all_gather_object(obj, what: str) -> list:
    out = [None] * dist.get_world_size()
    _collective(what, dist.all_gather_object, out, obj)
    return out


def barrier(what: str) -> None:
    _collective(what, dist.barrier)


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
# Data: each rank's slice of every global batch
# ---------------------------------------------------------------------------------------------------------------

class ShardedSource:
    """Wraps an activation source: same global batch order and position, each rank gets its contiguous slice.
    A language-model source is sliced by sequences before the model runs (each rank runs the model on its part)."""

    def __init__(self, source, rank: int, world: int):
        self._source, self.rank, self.world = source, rank, world

    def __getattr__(self, name):  # hookpoints, widths, tokens_per_batch (global), batches_per_epoch, data_info, ...
        return getattr(self._source, name)

    def _bounds(self, n: int) -> tuple[int, int]:
        cuts = np.linspace(0, n, self.world + 1).round().astype(int)
        return int(cuts[self.rank]), int(cuts[self.rank + 1])

    def batches(self, start: int = 0):
        src = self._source
        if getattr(src, "kind", None) == "model":
            for tokens in token_batches(src.chunks, src.batch_size, src.seed, start):
                lo, hi = self._bounds(len(tokens))
                yield src.activations(tokens[lo:hi])
            return
        for batch in src.batches(start=start):
            out = {}
            for hook, (x, y) in batch.items():
                lo, hi = self._bounds(x.shape[0])
                out[hook] = (x[lo:hi], x[lo:hi] if y is x else y[lo:hi])
            yield out


# ---------------------------------------------------------------------------------------------------------------
# The trainer, distributed
# ---------------------------------------------------------------------------------------------------------------

class DistributedTrainer(Trainer):
    """sae_torch.trainer.Trainer with the collectives of data parallelism or distribute_modules added around its
    steps; the algorithm (Trainer.fit) is unchanged."""

    def __init__(self, cfg, source, run, saved, device, progress=True, *args, **kwargs):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.modules = bool(cfg.distribute_modules)
        if self.modules and cfg.keep_best:
            raise UserError("keep_best is not supported with distribute_modules yet")
        if not self.modules:
            source = ShardedSource(source, self.rank, self.world)
        super().__init__(cfg, source, run, saved, device, progress and self.rank == 0, *args, **kwargs)
        self.shared_run = Path(run)
        self._scratch = None
        if self.rank != 0:  # metrics and plots of other ranks go to a scratch folder, never the run folder
            self._scratch = Path(tempfile.mkdtemp(prefix=f"sae-rank{self.rank}-"))
            self.run = self._scratch
        self._die = os.environ.get("SAE_DEBUG_DIE")
        if self.modules:
            self.owner = owners({n: c.hook for n, c in self.coders.items()}, self.world)
            self.coders = {n: c for n, c in self.coders.items() if self.owner[n] == self.rank}
        else:
            for c in self.coders.values():  # identical start on every rank (they are seeded alike anyway)
                for p in c.sae.parameters():
                    _collective("the initial broadcast", dist.broadcast, p.data, 0)
        self._bdec_global: set[str] = set()
        self._tokens_step = -1
        self._global_tokens = 0

    # ---- data parallel: weights, gradients, firing statistics ----

    def _global_total_variance(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y64 = y.double()
        pack = torch.cat([torch.tensor([y.shape[0]], dtype=torch.float64, device=y.device), y64.sum(0),
                          y64.pow(2).sum()[None]])
        all_reduce_(pack, "the total-variance all-reduce")
        n, s, sq = pack[0], pack[1:-1], pack[-1]
        return n, s, sq - s.pow(2).sum() / n

    def _forward_backward(self, c, x, y) -> None:
        if self.modules:
            return super()._forward_backward(c, x, y)
        cfg = self.cfg
        n, s, total_variance = self._global_total_variance(y.float())
        if self.step == 0 and c.name not in self._bdec_global:  # fit set the local mean; use the global one
            c.sae.b_dec.data = (s / n).to(c.sae.b_dec.dtype)
            self._bdec_global.add(c.name)
        if not hasattr(c, "fire_delta") or c.fire_delta is None:
            c.fire_delta = torch.zeros_like(c.fire_count)
        dead_mask = c.tokens_since_fired >= cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        chunks = list(zip(x.chunk(cfg.micro_acc_steps), y.chunk(cfg.micro_acc_steps)))
        tv = total_variance.float()
        for x_c, y_c in chunks:
            out = c.sae(x_c, y_c, dead_mask=dead_mask)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            # this rank's chunk renormalised by the global batch's variance: the summed gradients are the 1-rank's
            weight = ((y_c - y_c.mean(0)).pow(2).sum() / tv).detach() / cfg.grad_acc_steps
            if not torch.isfinite(loss):
                raise UserError(f"the loss of {c.name} became {loss.item()} at step {self.step} on rank "
                                f"{self.rank}; nothing was saved after the last checkpoint. Lower --lr or check "
                                f"the activations")
            (loss * weight).backward()
            active = out.latent_acts > 0
            fired_idx = out.latent_indices[active]
            c.fired[fired_idx] = True
            c.fire_delta += torch.bincount(fired_idx, minlength=c.sae.num_latents)
            for key, value in (("fvu", out.fvu), ("auxk", out.auxk_loss), ("multi_topk_fvu", out.multi_topk_fvu)):
                c.sums[key] = c.sums.get(key, 0.0) + float(value.detach()) * (float(weight) * cfg.grad_acc_steps)
            c.sums["l0"] = c.sums.get("l0", 0.0) + float(active.sum(-1).float().mean()) / len(chunks) / self.world
        c.sums["batches"] = c.sums.get("batches", 0) + 1

    def _optimizer_step(self, c, lr: float, step_tokens: int) -> None:
        if self._die and self._die.split(":")[:2] == [str(self.rank), str(self.step)]:
            if self._die.endswith(":hang"):
                print(f"rank {self.rank}: hanging at step {self.step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
                time.sleep(3600)
            print(f"rank {self.rank}: dying at step {self.step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
            os._exit(1)
        if self.modules:
            return super()._optimizer_step(c, lr, step_tokens)
        if self._tokens_step != self.step:  # once per step: the global token count of the step
            t = all_reduce_(torch.tensor([step_tokens], dtype=torch.int64, device=self.device),
                            "the token-count all-reduce")
            self._global_tokens, self._tokens_step = int(t), self.step
            self.tokens += self._global_tokens - step_tokens  # fit adds this rank's step_tokens after the step
        params = [p for p in c.sae.parameters() if p.grad is not None]
        if params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            all_reduce_(flat, "the gradient all-reduce")
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        stats = torch.cat([c.fired.to(torch.int64), c.fire_delta])
        all_reduce_(stats, "the firing-statistics all-reduce")
        m = c.sae.num_latents
        c.fired = stats[:m] > 0
        c.fire_count += stats[m:]
        c.fire_delta = None
        super()._optimizer_step(c, lr, self._global_tokens)

    # ---- logging ----

    def _log_record(self, lr_scale: float, tokens_per_s: float, elapsed: float) -> dict:
        if self.modules:
            record = super()._log_record(lr_scale, tokens_per_s, elapsed)
            merged = {}
            for part in all_gather_object(record, "the metrics gather"):
                merged.update(part)
            return merged
        keys = ("fvu", "auxk", "multi_topk_fvu", "l0")
        for c in self.coders.values():
            v = torch.tensor([c.sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.device)
            all_reduce_(v, "the metrics all-reduce")
            c.sums.update({k: float(x) for k, x in zip(keys, v)})
        return super()._log_record(lr_scale, tokens_per_s * self.world, elapsed)

    # ---- saving ----

    def save(self) -> None:
        if not self.modules:
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
            barrier("the checkpoint barrier")
            return
        for c in self.coders.values():  # the saved SAE is the optimizer's evaluation point (schedule-free's x)
            c.opt.eval()
        try:
            self._save_own_modules()
        finally:
            for c in self.coders.values():
                c.opt.train()

    def _save_own_modules(self) -> None:
        """distribute_modules: every rank writes its own coders into the shared checkpoint."""
        state = self.run_state()  # this rank's coders
        parts = all_gather_object({k: state[k] for k in ("lr", "coders", "best_fvu")}, "the checkpoint gather")
        if self.rank == 0:
            begin_save(self.shared_run)
        barrier("the checkpoint barrier")
        staging = self.shared_run / ".saving"
        for name, c in self.coders.items():
            folder = staging / name
            c.sae.save_to_disk(folder)
            tensors = {"tokens_since_fired": c.tokens_since_fired, "fire_count": c.fire_count,
                       **c.opt.state_tensors()}
            write_coder_state(folder, {k: v.detach().cpu().numpy() for k, v in tensors.items()},
                              self.cfg.optimizer, self.step)
            debug_pause("write", self.step)
        barrier("the checkpoint barrier")
        if self.rank == 0:
            for key in ("lr", "coders", "best_fvu"):
                state[key] = {k: v for part in parts for k, v in part[key].items()}
            order = {n: i for i, n in enumerate(_trainer.coder_names(self.source.hookpoints, self.cfg.init_seeds))}
            state["coders"] = dict(sorted(state["coders"].items(), key=lambda kv: order.get(kv[0], 0)))
            write_run_state(staging, state)
            commit_save(self.shared_run)
        barrier("the checkpoint barrier")
        self._saved_step = self.step
        for c in self.coders.values():
            c.fvu_since_save = []

    def _finish(self, interrupted: bool) -> dict:
        if self.rank == 0:
            result = super()._finish(interrupted)
        else:
            coders = {n: {"fvu": c.last.get(f"fvu/{n}", float("nan")), "l0": c.last.get(f"l0/{n}", float("nan")),
                          **coder_stats(c.fire_count.cpu().numpy(), c.tokens_since_fired.cpu().numpy(),
                                        self.cfg.dead_feature_threshold)} for n, c in self.coders.items()}
            result = {"run_dir": str(self.shared_run), "step": self.step, "tokens": self.tokens,
                      "elapsed_s": self.elapsed, "interrupted": interrupted, "coders": coders, "plots": []}
            shutil.rmtree(self._scratch, ignore_errors=True)
        result["run_dir"] = str(self.shared_run)
        if self.modules:
            merged = {}
            for part in all_gather_object(result["coders"], "the result gather"):
                merged.update(part)
            result["coders"] = merged
        result["rank"], result["world_size"] = self.rank, self.world
        return result


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _distributed_trainer_module():
    """Inside, sae_torch.trainer.train builds a DistributedTrainer, and the run folder is chosen (and an
    interrupted save recovered) by rank 0 alone, then shared with the others."""
    saved = {name: getattr(_trainer, name) for name in ("Trainer", "choose_run_dir", "read_run_state")}
    rank = dist.get_rank()

    def choose_run_dir(*args, **kwargs):
        answer = None
        if rank == 0:
            try:
                answer = ("ok", str(saved["choose_run_dir"](*args, **kwargs)))
            except UserError as e:
                answer = ("error", str(e))
        box = [answer]
        _collective("choosing the run folder", dist.broadcast_object_list, box, 0)
        if box[0][0] == "error":
            raise UserError(box[0][1])
        return Path(box[0][1])

    def read_run_state(run):
        if rank == 0:
            state = saved["read_run_state"](run)  # recovers an interrupted save first
            barrier("reading the checkpoint")
            return state
        barrier("reading the checkpoint")
        return saved["read_run_state"](run)

    _trainer.Trainer, _trainer.choose_run_dir, _trainer.read_run_state = \
        DistributedTrainer, choose_run_dir, read_run_state
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_trainer, name, value)


def train(cfg, source=None, **kwargs) -> dict:
    """sae_torch.trainer.train, distributed when launched by torchrun (WORLD_SIZE > 1); plain otherwise."""
    created = init()
    if not is_distributed():
        if cfg.distribute_modules:
            raise UserError("distribute_modules needs several ranks: launch with torchrun --nproc_per_node=N")
        return _trainer.train(cfg, source, **kwargs)
    if dist.get_rank() != 0:
        kwargs["progress"] = False
    try:
        with _distributed_trainer_module():
            return _trainer.train(cfg, source, **kwargs)
    finally:
        if created:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    """`torchrun ... -m sae_torch.distributed train ...`: the `sae` command, torch backend, with distributed
    training. Only rank 0 prints the summary."""
    from sae_core import cli

    class _Backend:  # what cli.backend_module returns for "trainer"
        @staticmethod
        def train(cfg, **kw):
            result = train(cfg, **kw)
            if result.get("rank", 0) != 0:
                sys.stdout = open(os.devnull, "w")  # the summary is rank 0's to print
            return result

    original = cli.backend_module
    cli.backend_module = lambda backend, part: _Backend if part == "trainer" else original(backend, part)
    try:
        return cli.main(argv, default_backend="torch")
    finally:
        cli.backend_module = original


if __name__ == "__main__":
    sys.exit(main())
