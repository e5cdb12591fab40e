"""Benchmarks of sae_torch (and sae_mlx) against EleutherAI's sparsify: `python -m bench --help`. See README.md."""
