"""The Metal harness builds with g++ and with clang++ (macOS has only Apple clang, whatever ``g++`` is called
there), including clang++ with macOS-like settings on Linux: no ``_GNU_SOURCE`` (which on glibc quietly defines
``_XOPEN_SOURCE``), ``__APPLE__`` defined, and a ``<ucontext.h>`` that stops with macOS's own ``#error`` unless
shim.h defined ``_XOPEN_SOURCE`` first. Every build runs kernels of each kind (plain, fp16 in and out, and
cooperative with ``simd_sum``) and must match the pure-MLX references; the fp16 conversions (clang < 15 on
x86-64 has no ``_Float16``, so shim.h brings its own) must round exactly like NumPy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
if not sys.platform.startswith("linux"):  # pragma: no cover
    pytest.skip("the Metal harness targets Linux", allow_module_level=True)

from parity.metal_harness import harness as H  # noqa: E402
from sae_mlx.kernels import sparse_rows as sr  # noqa: E402

MACOS_LIKE_INCLUDE = Path(__file__).parent / "data" / "macos_like_include"
MACOS_LIKE_FLAGS = f"-U_GNU_SOURCE -D__APPLE__ -isystem {MACOS_LIKE_INCLUDE}"

BUILDS = {
    "g++": ("g++", ""),
    "clang++": ("clang++", ""),
    "clang++-macos-like": ("clang++", MACOS_LIKE_FLAGS),
}


@pytest.fixture(params=list(BUILDS), ids=list(BUILDS))
def build(request, monkeypatch):
    cxx, flags = BUILDS[request.param]
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} is not installed (scripts/setup installs clang on Debian CI machines)")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv(H.EXTRA_FLAGS_ENV, flags)
    return request.param


def _inputs(seed, n, k, m, d, dtype):
    rng = np.random.default_rng(seed)
    idx = mx.array(rng.integers(0, m, size=(n, k)).astype(np.int32))
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(dtype)
    table = mx.array(rng.standard_normal((m, d)).astype(np.float32)).astype(dtype)
    rows = mx.array(rng.standard_normal((n, d)).astype(np.float32)).astype(dtype)
    return w, idx, table, rows


def test_kernels_match_references_with_each_compiler(build):
    w16, idx, t16, _ = _inputs(1, 5, 3, 11, 37, mx.float16)
    wb, idxb, tb, rb = _inputs(2, 5, 3, 11, 45, mx.bfloat16)
    w, idx32, _, rows = _inputs(3, 6, 2, 7, 33, mx.float32)
    cases = [
        (sr.plan_gather_weighted_sum(w16, idx, t16), sr.gather_weighted_sum_reference(w16, idx, t16), 2e-3),
        (sr.plan_gather_dot(rb, tb, idxb), sr.gather_dot_reference(rb, tb, idxb), 1e-2),
        (sr.plan_scatter_outer(w, idx32, rows, 7), sr.scatter_outer_reference(w, idx32, rows, 7), 1e-5),
    ]
    results = H.run_many([launch for launch, _, _ in cases])
    for (launch, ref, tol), (got,) in zip(cases, results):
        expect = np.array(ref.astype(mx.float32))
        got = np.asarray(got, dtype=np.float32)
        assert np.abs(got - expect).max() <= tol * np.abs(expect).max(), (build, launch.spec.name)


def test_fp16_conversions_round_like_numpy(build):
    rng = np.random.default_rng(4)
    specials = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 70000.0, -1e9, 6.1e-5, 6.0e-8, 2.98e-8, 3.0e-8,
                1e-9, 1.00048828125, 1.000732421875, np.inf, -np.inf]
    vals = np.concatenate([np.array(specials, np.float32),
                           rng.standard_normal(400).astype(np.float32) * np.float32(10.0) ** rng.integers(-8, 5, 400),
                           np.linspace(-3e-5, 3e-5, 101, dtype=np.float32)]).astype(np.float32)
    with np.errstate(over="ignore"):  # the values past 65520 are there to overflow to inf
        halves = vals.astype(np.float16)
    spec = sr.MetalKernelSpec(name="harness_fp16", input_names=("x", "h"), output_names=("to_half", "to_float"),
                              source="const uint i = thread_position_in_grid.x;\n"
                                     "to_half[i] = static_cast<half>(x[i]);\n"
                                     "to_float[i] = float(h[i]);\n")
    launch = sr.MetalLaunch(spec=spec, inputs=[mx.array(vals), mx.array(halves)], grid=(vals.size, 1, 1),
                            threadgroup=(64, 1, 1), output_shapes=[(vals.size,), (vals.size,)],
                            output_dtypes=[mx.float16, mx.float32])
    to_half, to_float = H.run_launch(launch)
    np.testing.assert_array_equal(to_half.view(np.uint16), halves.view(np.uint16))
    np.testing.assert_array_equal(to_float, halves.astype(np.float32))


def test_macos_like_settings_reproduce_the_macos_error_without_the_shims_define(tmp_path):
    """The stand-in header is a real check: the same macOS-like build of a file that includes <ucontext.h>
    without defining _XOPEN_SOURCE first fails with macOS's message."""
    if shutil.which("clang++") is None:
        pytest.skip("clang++ is not installed")
    src = tmp_path / "bare.cpp"
    src.write_text("#include <cstdio>\n#include <ucontext.h>\nint main() { return 0; }\n")
    done = subprocess.run(["clang++", "-std=c++20", "-fsyntax-only", *MACOS_LIKE_FLAGS.split(), str(src)],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "require _XOPEN_SOURCE to be defined" in done.stderr


def test_generated_instantiation_is_left_out_of_the_build():
    w, idx, table, _ = _inputs(5, 3, 2, 5, 9, mx.float32)
    launch = sr.plan_gather_weighted_sum(w, idx, table)
    source = H.capture_source(launch)
    assert "template [[host_name(" in source  # MLX writes it ...
    parsed = H.parse_kernel_source(source)
    driver = H._driver_source(parsed, source)
    assert "[[host_name(" not in driver  # ... the harness build does not need it (clang rejects it there)
    assert f"{parsed.function_name}<float>(" in driver  # the call instantiates the same specialisation


def test_parity_reports_a_failing_path_and_still_runs_the_others():
    """A compiler that refuses the kernel source (as Apple clang did before shim.h defined _XOPEN_SOURCE) makes
    metal-harness a failed path with its reason; mlx-fallback's rows and the table still come, exit code 1."""
    done = subprocess.run(
        [sys.executable, "-m", "parity", "--paths", "mlx-fallback,metal-harness", "--quick", "--dtypes", "float32"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "CXX": "false"},
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    failed = [line for line in lines if line.startswith("metal-harness") and "path failed" in line]
    assert len(failed) == 1 and "FAIL" in failed[0] and "could not compile" in failed[0]
    fallback = [line for line in lines if line.startswith("mlx-fallback")]
    assert fallback and all(" pass " in line for line in fallback)
