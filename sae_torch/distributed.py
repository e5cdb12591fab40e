"""Distributed training, torch side: data parallel (the default) or `--distribute_modules` (sparsify's name).

Launch with torchrun (NCCL on CUDA, gloo on CPU):

    torchrun --nproc_per_node=N -m sae_torch.distributed train --hookpoints layers.6 ...
    torchrun --nproc_per_node=N -m sae_torch.distributed train --distribute_modules --layers 0 1 2 3 ...

The loop is sae_core.loop's (read it for the scheme); this module gives it a `TorchComms` (the process group).

Design notes: docs/internals.md, section `sae_torch/distributed.py`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from sae_core.errors import UserError

from . import trainer as _trainer

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


class TorchComms:
    """sae_core.loop's Comms over torch.distributed (the default process group)."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"  # its collectives take CUDA tensors only
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._die = os.environ.get("SAE_DEBUG_DIE")

    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
            raise UserError(f"rank {self.rank}: lost the other ranks during {what} (another rank stopped or "
                            f"died; its own error is above): {str(e).splitlines()[0]}") from None

    def all_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """In place, and returned."""
        self._collective(what, dist.all_reduce, tensor)
        return tensor

    def all_sum_floats(self, values: list[float], what: str) -> list[float]:
        return self.all_sum(torch.tensor(values, dtype=torch.float64, device=self.device), what).tolist()

    def all_sum_int(self, value: int, what: str) -> int:
        return int(self.all_sum(torch.tensor([value], dtype=torch.int64, device=self.device), what))

    def broadcast_(self, tensor: torch.Tensor, what: str) -> None:
        self._collective(what, dist.broadcast, tensor, 0)

    def barrier(self, what: str) -> None:
        self._collective(what, dist.barrier)

    def share_text(self, text: str, what: str) -> str:
        box = [text]
        self._collective(what, dist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj, what: str) -> list:
        out = [None] * self.world
        self._collective(what, dist.all_gather_object, out, obj)
        return out

    def before_step(self, step: int) -> None:
        """Test hook: SAE_DEBUG_DIE="<rank>:<step>[:hang]" makes that rank exit(1) (or sleep) before that step."""
        if self._die and self._die.split(":")[:2] == [str(self.rank), str(step)]:
            if self._die.endswith(":hang"):
                print(f"rank {self.rank}: hanging at step {step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
                time.sleep(3600)
            print(f"rank {self.rank}: dying at step {step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
            os._exit(1)


def train(cfg, source=None, **kwargs) -> dict:
    """sae_torch.trainer.train, distributed when launched by torchrun (WORLD_SIZE > 1); plain otherwise."""
    created = init()
    if not is_distributed():
        if cfg.distribute_modules:
            raise UserError("distribute_modules needs several ranks: launch with torchrun --nproc_per_node=N")
        return _trainer.train(cfg, source, **kwargs)
    try:
        return _trainer.train(cfg, source, comms=TorchComms(), **kwargs)
    finally:
        if created:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    """`torchrun ... -m sae_torch.distributed train ...`: the `sae` command, torch backend, with distributed
    training. Only rank 0 prints the summary."""
    from sae_core import cli

    return cli.main(argv, default_backend="torch", train=train)


if __name__ == "__main__":
    sys.exit(main())
