"""`python -m sae_mlx ...`: the `sae` command (sae_core.cli) with the MLX backend as the default (`--backend`
still chooses). Started by mlx.launch with several processes, it trains data parallel (sae_mlx.distributed).
On Linux the MLX trainer runs the language model with torch unless SAE_MLX_MODEL_RUNNER=mlx-lm (see
sae_mlx.activations)."""
import os
import sys

from sae_core.cli import main


def _launched_with_several_processes() -> bool:
    """mlx.launch's ring backend sets MLX_RANK (and MLX_HOSTFILE); its MPI backend runs under mpirun."""
    if "MLX_RANK" in os.environ and "MLX_HOSTFILE" in os.environ:
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) > 1


if __name__ == "__main__":
    if _launched_with_several_processes():  # hook: distributed training (sae_mlx.distributed; alone: plain)
        from sae_mlx.distributed import main as distributed_main

        sys.exit(distributed_main())
    sys.exit(main(default_backend="mlx"))
