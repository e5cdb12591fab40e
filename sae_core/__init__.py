"""Framework-free parts shared by sae_torch and sae_mlx: config, checkpoint I/O, conversion, data, CLI."""
from .config import SparseCoderConfig
from .errors import CheckpointError, UserError

__all__ = ["SparseCoderConfig", "CheckpointError", "UserError"]
