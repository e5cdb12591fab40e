"""Kernels of the MLX backend. See :mod:`sae_mlx.kernels.sparse_rows`."""

from .sparse_rows import (
    HAS_METAL,
    gather_dot,
    gather_dot_metal,
    gather_dot_reference,
    gather_weighted_sum,
    gather_weighted_sum_metal,
    gather_weighted_sum_reference,
    scatter_outer,
    scatter_outer_metal,
    scatter_outer_reference,
    sparse_decode,
    sparse_encode,
    use_metal,
)

__all__ = [
    "HAS_METAL",
    "gather_dot",
    "gather_dot_metal",
    "gather_dot_reference",
    "gather_weighted_sum",
    "gather_weighted_sum_metal",
    "gather_weighted_sum_reference",
    "scatter_outer",
    "scatter_outer_metal",
    "scatter_outer_reference",
    "sparse_decode",
    "sparse_encode",
    "use_metal",
]
