"""Kernels of the torch backend: sparse row kernels (:mod:`sae_torch.kernels.sparse_rows`) and the dense-subset
AuxK (:mod:`sae_torch.kernels.row_subset`)."""

from .row_subset import subset_decode, subset_decode_reference
from .sparse_rows import (
    HAS_TRITON,
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

__all__ = [
    "HAS_TRITON",
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
    "sparse_decode",
    "sparse_encode",
    "subset_decode",
    "subset_decode_reference",
    "use_triton",
]
