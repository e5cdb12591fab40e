"""`python -m sae_mlx ...`: the `sae` command (sae_core.cli) with the MLX backend as the default (`--backend`
still chooses). On Linux the MLX trainer runs the language model with torch unless SAE_MLX_MODEL_RUNNER=mlx-lm
(see sae_mlx.activations)."""
import os
import sys

from sae_core.cli import main

if __name__ == "__main__":
    if "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:  # hook: started by mlx.launch (ring/MPI)
        from sae_mlx.distributed import main as distributed_main  # data-parallel training (sae_mlx.distributed)

        sys.exit(distributed_main())
    sys.exit(main(default_backend="mlx"))
