"""`python -m sae_mlx ...`: the `sae` command (sae_core.cli) with the MLX backend as the default (`--backend`
still chooses). Started by mlx.launch (ring, jaccl or MPI) with several processes, it trains data parallel
(sae_mlx.distributed). On Linux the MLX trainer runs the language model with torch (when installed) unless
SAE_MLX_MODEL_RUNNER=mlx-lm (see sae_mlx.activations)."""
import sys

from sae_core.cli import main

if __name__ == "__main__":
    from sae_mlx.distributed import launched_by_mlx

    if launched_by_mlx():  # distributed training (alone in its group: plain)
        from sae_mlx.distributed import main as distributed_main

        sys.exit(distributed_main())
    sys.exit(main(default_backend="mlx"))
