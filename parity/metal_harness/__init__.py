"""Linux harness for the Metal kernels of sae_mlx: captures the source MLX generates, checks its signature,
compiles it with g++ or clang++ behind ``shim.h`` and runs it on NumPy buffers.
See :mod:`parity.metal_harness.harness`."""

from .harness import (
    HarnessError,
    KernelFault,
    SignatureMismatch,
    cache_dir,
    capture_source,
    compiler,
    compiler_command,
    compiler_missing,
    capture_sources,
    check_signature,
    compile_kernel,
    expected_signature,
    kernels_through_harness,
    parse_kernel_source,
    run_launch,
    run_many,
)

__all__ = [
    "HarnessError",
    "KernelFault",
    "SignatureMismatch",
    "cache_dir",
    "capture_source",
    "compiler",
    "compiler_command",
    "compiler_missing",
    "capture_sources",
    "check_signature",
    "compile_kernel",
    "expected_signature",
    "kernels_through_harness",
    "parse_kernel_source",
    "run_launch",
    "run_many",
]
