import os

# The fp32 ceilings (1e-4 of the largest value) assume full fp32 matmuls. MLX runs fp32 matmuls at TF32-like
# precision on Apple GPUs with matrix units (M5 class; MLX_ENABLE_TF32 defaults to 1), about 1e-3 relative per
# product, so parity turns that off before MLX is imported; a user's own setting wins and --report records it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
