"""`python -m sae_mlx ...`: the `sae` command (sae_core.cli) with the MLX backend as the default (`--backend`
still chooses). On Linux the MLX trainer runs the language model with torch unless SAE_MLX_MODEL_RUNNER=mlx-lm
(see sae_mlx.activations)."""
import sys

from sae_core.cli import main

if __name__ == "__main__":
    sys.exit(main(default_backend="mlx"))
