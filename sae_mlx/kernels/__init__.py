"""Kernels of the MLX backend: sparse row kernels (:mod:`sae_mlx.kernels.sparse_rows`), the dense-subset AuxK
(:mod:`sae_mlx.kernels.row_subset`) and the per-row top-k selection (:mod:`sae_mlx.kernels.topk`)."""

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
from .topk import topk_indices, topk_indices_metal, topk_indices_reference, use_metal_topk

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
    "topk_indices",
    "topk_indices_metal",
    "topk_indices_reference",
    "use_metal",
    "use_metal_topk",
]
