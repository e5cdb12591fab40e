"""Kernels of the torch backend: sparse row kernels (:mod:`sae_torch.kernels.sparse_rows`), the dense-subset
AuxK (:mod:`sae_torch.kernels.row_subset`) and the one-read top-k selection (:mod:`sae_torch.kernels.topk`)."""

from .row_subset import subset_decode, subset_decode_reference
from .sparse_rows import (
    HAS_TRITON,
    SCATTER_KERNELS,
    SparseDecode,
    SparseEncode,
    gather_dot,
    gather_dot_reference,
    gather_dot_triton,
    gather_weighted_sum,
    gather_weighted_sum_reference,
    gather_weighted_sum_triton,
    scatter_outer,
    scatter_outer_reference,
    scatter_outer_triton,
    sparse_decode,
    sparse_encode,
    use_triton,
)
from .topk import Selection, select_topk, select_topk_reference, select_topk_triton

__all__ = [
    "HAS_TRITON",
    "SCATTER_KERNELS",
    "Selection",
    "SparseDecode",
    "SparseEncode",
    "gather_dot",
    "gather_dot_reference",
    "gather_dot_triton",
    "gather_weighted_sum",
    "gather_weighted_sum_reference",
    "gather_weighted_sum_triton",
    "scatter_outer",
    "scatter_outer_reference",
    "scatter_outer_triton",
    "select_topk",
    "select_topk_reference",
    "select_topk_triton",
    "sparse_decode",
    "sparse_encode",
    "subset_decode",
    "subset_decode_reference",
    "use_triton",
]
