"""Kernels of the MLX backend: sparse row kernels (:mod:`sae_mlx.kernels.sparse_rows`) and the dense-subset
AuxK (:mod:`sae_mlx.kernels.row_subset`)."""

from .row_subset import subset_decode, subset_decode_reference
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
    "subset_decode",
    "subset_decode_reference",
    "use_metal",
]
