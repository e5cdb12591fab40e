"""Distributed training, MLX side: data parallel over `mx.distributed` (ring over TCP, JACCL over Thunderbolt RDMA,
MPI where present).

Launch with mlx.launch (one process per Mac, or several on one machine). The ring backend needs IP addresses, not
hostnames (`ipconfig getifaddr en0` on each Mac; a hostfile can also list `ssh` names with their `ips`):

Design notes: docs/internals.md, section `sae_mlx/distributed.py`.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import mlx.core as mx
import numpy as np

from sae_core.errors import UserError

from . import trainer as _trainer

DEFAULT_TIMEOUT_S = 600
PATH_BYTES = 4096
# What mlx.launch sets in each process (MLX 0.32, mlx/_distributed_utils/launch.py): MLX_RANK for every backend,
# plus MLX_HOSTFILE (ring), MLX_JACCL_COORDINATOR and MLX_IBV_DEVICES (jaccl, jaccl-ring), MLX_WORLD_SIZE (nccl);
# the MPI backend runs under mpirun.
LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES", "MLX_WORLD_SIZE")


def launched_by_mlx(env=os.environ) -> bool:
    """Whether this process was started by mlx.launch (any backend) or mpirun with several processes."""
    if "MLX_RANK" in env and any(k in env for k in LAUNCH_ENV):
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1"))) > 1


def launched_world_size(env=os.environ) -> int:
    """How many processes the launcher started, from what it handed this one: the JACCL device matrix (one row
    per rank), the ring hostfile (one entry per rank; empty for one), MLX_WORLD_SIZE, or MPI's size."""
    for key in ("MLX_IBV_DEVICES", "MLX_HOSTFILE"):
        if env.get(key):
            try:
                text = open(env[key]).read().strip()
                return len(json.loads(text)) if text else 1
            except (OSError, ValueError):
                return 1  # not a file of the launcher's: MLX itself reports what it makes of it
    return int(env.get("MLX_WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1"))))


class MlxComms:
    """sae_core.loop's Comms over an `mx.distributed` group, with a watchdog that ends the process when a
    collective stalls."""

    def __init__(self, group, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self.rank, self.world = group.rank(), group.size()
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

    def all_sum_floats(self, values: list[float], what: str) -> list[float]:
        return np.array(self.all_sum(mx.array(values, dtype=mx.float32), what)).tolist()

    def all_sum_int(self, value: int, what: str) -> int:
        return int(self.all_sum(mx.array([value], dtype=mx.int32), what).item())

    def barrier(self, what: str) -> None:
        self.all_sum(mx.array([1.0]), what)

    def gather(self, obj, what: str) -> list:
        raise UserError("distribute_modules is implemented by the torch backend only (torchrun); the MLX backend "
                        "trains data parallel")

    def before_step(self, step: int) -> None:
        """Test hook: SAE_DEBUG_DIE="<rank>:<step>[:hang]" makes that rank exit(1) (or sleep) before that step."""
        die = os.environ.get("SAE_DEBUG_DIE")
        if die and die.split(":")[:2] == [str(self.rank), str(step)]:
            if die.endswith(":hang"):
                print(f"rank {self.rank}: hanging at step {step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
                time.sleep(3600)
            print(f"rank {self.rank}: dying at step {step} (SAE_DEBUG_DIE)", file=sys.stderr, flush=True)
            os._exit(1)

    def share_text(self, text: str | None, what: str) -> str:
        """Rank 0's string, on every rank."""
        data = np.zeros(PATH_BYTES, dtype=np.int32)
        if self.rank == 0:
            raw = np.frombuffer(text.encode(), dtype=np.uint8)
            if len(raw) >= PATH_BYTES:
                raise UserError(f"{what}: text too long to share ({len(raw)} bytes)")
            data[:len(raw)] = raw
        out = np.array(self.all_sum(mx.array(data), what)).astype(np.uint8)
        return out[:np.argmin(out) if (out == 0).any() else len(out)].tobytes().decode()


_COMMS: MlxComms | None = None


def init(timeout_s: float | None = None) -> MlxComms | None:
    """Join the group mlx.launch describes (ring, jaccl or MPI; MLX picks the backend from the environment);
    None when alone. A launch of several processes whose group MLX cannot form stops here: otherwise every rank
    would train alone into the same run folder."""
    global _COMMS
    if _COMMS is not None:
        return _COMMS
    launched = launched_world_size() if launched_by_mlx() else 1
    group = mx.distributed.init() if mx.distributed.is_available() else None
    size = group.size() if group is not None else 1
    if size != launched:
        backend = "jaccl" if "MLX_JACCL_COORDINATOR" in os.environ else "ring" if "MLX_HOSTFILE" in os.environ \
            else "the launcher's backend"
        raise UserError(f"mlx.launch started {launched} processes ({backend}), but MLX joined a group of {size}: "
                        f"the ranks cannot talk (jaccl needs macOS 26.2+ with RDMA over Thunderbolt 5 enabled; the "
                        f"ring backend needs the hosts' IP addresses, not hostnames)")
    if size <= 1:
        return None
    timeout_s = float(os.environ.get("SAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    _COMMS = MlxComms(group, timeout_s)
    return _COMMS


def train(cfg, source=None, **kwargs) -> dict:
    """sae_mlx.trainer.train, data parallel when launched by mlx.launch with several processes; plain otherwise."""
    if cfg.distribute_modules:
        raise UserError("distribute_modules is implemented by the torch backend only (torchrun); the MLX backend "
                        "trains data parallel")
    comms = init()
    if comms is None:
        return _trainer.train(cfg, source, **kwargs)
    result = _trainer.train(cfg, source, comms=comms, **kwargs)
    comms.barrier("the final barrier")
    return result


def main(argv: list[str] | None = None) -> int:
    """`mlx.launch ... -- python -m sae_mlx train ...`: the `sae` command, MLX backend, data parallel.
    Only rank 0 prints the summary."""
    from sae_core import cli

    return cli.main(argv, default_backend="mlx", train=train)


if __name__ == "__main__":
    sys.exit(main())
