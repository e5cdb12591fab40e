"""torch backend: SparseCoder with Triton kernels on CUDA and an eager path everywhere else."""
from sae_core.config import SparseCoderConfig

from .sparse_coder import EncoderOutput, ForwardOutput, SparseCoder

__all__ = ["SparseCoder", "SparseCoderConfig", "ForwardOutput", "EncoderOutput"]
