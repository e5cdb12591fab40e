"""MLX backend: SparseCoder, the mirror of sae_torch's, with custom-vjp sparse kernels (Metal on Apple silicon)."""
from sae_core.config import SparseCoderConfig

from .sparse_coder import EncoderOutput, ForwardOutput, SparseCoder

__all__ = ["SparseCoder", "SparseCoderConfig", "ForwardOutput", "EncoderOutput"]
