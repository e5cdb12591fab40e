"""Kernels of the torch backend. See :mod:`sae_torch.kernels.sparse_rows`."""

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
    "use_triton",
]
