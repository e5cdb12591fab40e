"""Checks of the arguments of the SparseCoder API (forward, encode, decode, dead_mask), shared by both backends.

Both `sparse_coder.py` describe each argument as an `ArrayInfo` (their own array type or not, shape, dtype name) and
call these functions, so a bad call raises the same exception type with the same message in torch and in MLX:
`InputTypeError` (a TypeError) for a wrong type or dtype, `InputValueError` (a ValueError) for a wrong shape, an
index out of range or a batch whose total variance is 0. Both are also UserErrors, so the trainer and the CLI report
them in one line. Without these checks the frameworks answered with their own errors, different per backend, or
not at all: MLX reads out of bounds for a long dead_mask or a decode index >= M.

Cost: shape and dtype checks read attributes only. The checks that read values are kept to the two places that
cannot do without them: decode's index range (user indices; one min/max reduction and one host read) and the total
variance being 0 (a scalar the forward computes anyway; one host read).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .errors import InputTypeError, InputValueError

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INDEX_DTYPES = ("int64", "int32", "int16", "int8", "uint32", "uint16", "uint8")
ARRAY_TYPES = "torch.Tensor for sae_torch, mlx.core.array for sae_mlx"


class ArrayInfo(NamedTuple):
    """What the checks need to know of an argument; `other_type` is set (to its type's name) when it is not the
    backend's array type, and then shape and dtype are None."""
    other_type: str | None
    shape: tuple[int, ...] | None
    dtype: str | None


def type_name(value) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _require_array(name: str, info: ArrayInfo) -> None:
    if info.other_type is not None:
        raise InputTypeError(f"{name} must be an array of the coder's backend ({ARRAY_TYPES}), got {info.other_type}")


def check_rows(name: str, info: ArrayInfo, width: int, width_name: str, coder_dtype: str,
               rows: int | None = None) -> int:
    """An activation matrix x or y: [N, width] (N >= 1, or N == rows when given) of a float dtype (float32, bfloat16,
    float16, or the coder's own, e.g. float64 for a float64 coder); returns N."""
    _require_array(name, info)
    shape = info.shape
    want = f"[{'N' if rows is None else f'N={rows}'}, {width_name}={width}]"
    if len(shape) != 2 or shape[1] != width or (rows is not None and shape[0] != rows):
        hint = " (flatten the leading dimensions first: x.reshape(-1, d))" if len(shape) > 2 else ""
        raise InputValueError(f"{name} must have shape {want} (tokens x features), got shape {shape}{hint}")
    if shape[0] == 0:
        raise InputValueError(f"{name} has no rows (shape {shape}): pass at least one token")
    if info.dtype not in FLOAT_DTYPES and info.dtype != coder_dtype:
        raise InputTypeError(f"{name} must have a float dtype ({', '.join(FLOAT_DTYPES)}), got {info.dtype}")
    return shape[0]


def check_forward(x: ArrayInfo, y: ArrayInfo | None, dead_mask: ArrayInfo | None, d_in: int, d_out: int,
                  num_latents: int, coder_dtype: str) -> None:
    rows = check_rows("x", x, d_in, "d_in", coder_dtype)
    if y is not None:
        check_rows("y", y, d_out, "d_out", coder_dtype, rows)
    elif d_out != d_in:
        raise InputValueError(f"y is required: this transcoder predicts d_out={d_out} features from d_in={d_in}")
    if dead_mask is not None:
        check_dead_mask(dead_mask, num_latents)


def check_dead_mask(info: ArrayInfo, num_latents: int) -> None:
    _require_array("dead_mask", info)
    if info.shape != (num_latents,):
        raise InputValueError(f"dead_mask must have shape [M={num_latents}] (one flag per latent), got shape "
                              f"{info.shape}")
    if info.dtype != "bool":
        raise InputTypeError(f"dead_mask must have dtype bool, got {info.dtype}")


def check_codes(acts: ArrayInfo, indices: ArrayInfo, coder_dtype: str) -> bool:
    """decode's arguments: top_acts [N, k] float, top_indices of the same shape and an integer dtype. Returns
    whether the index range must still be checked (there is at least one index)."""
    _require_array("top_acts", acts)
    _require_array("top_indices", indices)
    if len(acts.shape) != 2 or acts.shape[0] == 0:
        raise InputValueError(f"top_acts must have shape [N, k] with N >= 1, got shape {acts.shape}")
    if acts.dtype not in FLOAT_DTYPES and acts.dtype != coder_dtype:
        raise InputTypeError(f"top_acts must have a float dtype ({', '.join(FLOAT_DTYPES)}), got {acts.dtype}")
    if indices.shape != acts.shape:
        raise InputValueError(f"top_indices must have the shape of top_acts {acts.shape}, got shape {indices.shape}")
    if indices.dtype not in INDEX_DTYPES:
        raise InputTypeError(f"top_indices must have an integer dtype, got {indices.dtype}")
    return acts.shape[1] > 0


def check_index_range(lowest: int, highest: int, num_latents: int) -> None:
    if lowest < 0 or highest >= num_latents:
        raise InputValueError(f"top_indices must lie in [0, M={num_latents}), got values from {lowest} to {highest}")


def check_total_variance(total_variance: float, rows: int) -> None:
    """FVU divides by the targets' total variance: 0 (one token, or identical rows) would give Inf/NaN losses and
    non-finite gradients."""
    if not math.isfinite(total_variance):
        raise InputValueError(f"the targets contain NaN or Inf values (their total variance is {total_variance})")
    if total_variance <= 0:
        what = "a single token" if rows == 1 else f"all {rows} rows of the targets are identical"
        raise InputValueError(f"the batch's total variance is {total_variance} ({what}): FVU = error / total "
                              f"variance is undefined; pass a batch of at least 2 different tokens")
