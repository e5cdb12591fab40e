"""The Metal kernels of sae_mlx run on Linux through parity/metal_harness: MLX's generated source for each launch
is captured, its signature checked, compiled with g++ behind shim.h and executed over the launch grid; the outputs
are compared with the pure-MLX references (and a float64 oracle where indices are out of range). Also: the
harness rejects a signature it does not expect, and its runtime catches out-of-bounds accesses, unwritten outputs
and divergent barriers / SIMD operations (toy kernels)."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
if not sys.platform.startswith("linux"):  # pragma: no cover
    pytest.skip("the Metal harness targets Linux (on a Mac, test_mlx_kernels.py runs the real kernels)",
                allow_module_level=True)
from parity.metal_harness import harness as H  # noqa: E402

if H.compiler_missing():  # pragma: no cover - the CI image has g++ and clang++
    pytest.skip(H.compiler_missing(), allow_module_level=True)
from sae_mlx.kernels import sparse_rows as sr  # noqa: E402

F32, BF16, F16 = mx.float32, mx.bfloat16, mx.float16
I32, U32, I64 = mx.int32, mx.uint32, mx.int64
_NP_IDX = {I32: np.int32, U32: np.uint32, I64: np.int64}


def to_f64(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16).astype(np.float64)
    return np.array(a).astype(np.float64)


def make_inputs(seed, n, k, m, d, wdt, tdt, idt, oob=False):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m, size=(n, k))
    if k > 1:
        idx[:, -1] = idx[:, 0]  # repeated latent within a row
    idx[n // 2] = idx[0]  # repeated across rows
    idx[-1, 0], idx[0, -1] = m - 1, 0  # the last and the first latent: an off-by-one in an index bound shows
    if oob:  # out-of-range entries: the kernels must skip them without touching memory out of bounds
        idx[0, 0] = m
        idx[-1, -1] = m + 1000
        if idt != U32:
            idx[n // 2, 0] = -1
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(wdt)
    ind = mx.array(idx.astype(_NP_IDX[idt]))
    table = mx.array(rng.standard_normal((m, d)).astype(np.float32)).astype(tdt)
    rows = mx.array(rng.standard_normal((n, d)).astype(np.float32)).astype(wdt)
    return w, ind, table, rows


def _valid(idx, m):
    i = np.array(idx).astype(np.int64)
    return i, (i >= 0) & (i < m)


def oracle(kind, w, idx, table, rows, m):
    """float64, skipping out-of-range indices (what the Metal kernels promise); scatter ignores ``table``."""
    i, ok = _valid(idx, m)
    ic = np.where(ok, i, 0)
    t = to_f64(table)
    if kind == "gws":
        return ((to_f64(w) * ok)[:, :, None] * t[ic]).sum(axis=1)
    if kind == "gdot":
        return (t[ic] * to_f64(rows)[:, None, :]).sum(axis=-1) * ok
    out = np.zeros((m, rows.shape[1]))
    wr = (to_f64(w) * ok)[:, :, None] * to_f64(rows)[:, None, :]
    np.add.at(out, ic.reshape(-1), wr.reshape(-1, rows.shape[1]))
    return out


# name: (kernel, N, k, M, d, weights/rows dtype, table dtype, index dtype, out-of-range indices)
CASES = {
    # odd widths, several threadgroups in y, the last one partial
    "gws-f32-d77-i32": ("gws", 13, 4, 29, 77, F32, F32, I32, False),
    "gws-bf16-d129-u32": ("gws", 7, 5, 19, 129, BF16, BF16, U32, False),
    # d = 300 > 256: two groups along x, the second partial (44 threads); k = 1; mixed bf16/fp32; int64
    "gws-mixed-d300-k1-i64": ("gws", 5, 1, 37, 300, BF16, F32, I64, False),
    # every input smaller than 8 elements -> MLX passes it in the constant address space
    "gws-tiny-constant": ("gws", 1, 3, 2, 3, F32, F32, I32, False),
    "gws-oob": ("gws", 6, 3, 11, 33, F32, F32, I32, True),
    # gather_dot: grid (32, k, N), groups (32, min(k,8), 8 // min(k,8)): k = 9 -> partial group in y;
    # k = 1 -> 8 tokens per group, N = 11 -> partial in z; k = 3 -> (32, 3, 2), N = 13 -> partial in z
    "gdot-f32-d77-k9-i32": ("gdot", 5, 9, 29, 77, F32, F32, I32, False),
    "gdot-bf16-d129-k1-u32": ("gdot", 11, 1, 19, 129, BF16, BF16, U32, False),
    "gdot-mixed-d300-k3-i64": ("gdot", 13, 3, 37, 300, F32, BF16, I64, False),
    "gdot-f16-d7": ("gdot", 4, 2, 3, 7, F16, F32, I32, False),
    "gdot-oob": ("gdot", 6, 3, 11, 33, F32, F32, I64, True),
    # scatter_outer: grid (d, M): M = 29 / 19 not multiples of the group height; repeats; M = 1 -> constant offsets
    "scatter-f32-d77-i32": ("scatter", 13, 4, 29, 77, F32, F32, I32, False),
    "scatter-bf16-d129-u32": ("scatter", 7, 5, 19, 129, BF16, BF16, U32, False),
    "scatter-mixed-d300-k1-i64": ("scatter", 9, 1, 37, 300, BF16, F32, I64, False),
    "scatter-m1": ("scatter", 3, 2, 1, 9, F32, F32, I32, False),
    "scatter-oob": ("scatter", 6, 3, 11, 33, F32, F32, I32, True),
}


def build(name):
    kind, n, k, m, d, wdt, tdt, idt, oob = CASES[name]
    w, idx, table, rows = make_inputs(len(name), n, k, m, d, wdt, tdt, idt, oob)
    if kind == "gws":
        launch = sr.plan_gather_weighted_sum(w, idx, table)
        ref = None if oob else sr.gather_weighted_sum_reference(w, idx, table)
    elif kind == "gdot":
        launch = sr.plan_gather_dot(rows, table, idx)
        ref = None if oob else sr.gather_dot_reference(rows, table, idx)
    else:
        launch = sr.plan_scatter_outer(w, idx, rows, m)
        ref = None if oob else sr.scatter_outer_reference(w, idx, rows, m)
    return launch, ref, oracle(kind, w, idx, table, rows, m)


@pytest.fixture(scope="module")
def harness_results():
    """All cases through the harness at once (one capture subprocess, parallel compilation)."""
    names = list(CASES)
    built = {name: build(name) for name in names}
    results = H.run_many([built[name][0] for name in names])
    return {name: (built[name], out) for name, out in zip(names, results)}


def _assert_close(got: np.ndarray, ref: np.ndarray, out_is_bf16: bool, what: str):
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    tol = 1e-2 if out_is_bf16 else 1e-5
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(to_f64(got) - ref).max())
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol} * max|ref| {scale:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_metal_kernel_matches_reference(harness_results, name):
    (launch, ref, exact), outputs = harness_results[name]
    (got,) = outputs
    out_dt = launch.output_dtypes[0]
    bf16 = out_dt == BF16
    assert got.dtype == (ml_dtypes.bfloat16 if bf16 else np.float32)
    _assert_close(got, exact, bf16, "vs float64 oracle")
    if ref is not None:
        assert ref.dtype == out_dt
        _assert_close(got, to_f64(ref), bf16, "vs MLX reference")


def test_launch_shapes_exercise_partial_groups():
    """The cases above really cover what they claim: partial groups in x, y and z, constant-space inputs."""
    def groups(launch):
        grid, tg = launch.grid, [min(t, g) for t, g in zip(launch.threadgroup, launch.grid)]
        return [g % t != 0 for g, t in zip(grid, tg)]

    assert groups(build("gws-mixed-d300-k1-i64")[0])[0]  # x
    assert groups(build("gws-f32-d77-i32")[0])[1]  # y
    assert groups(build("gdot-f32-d77-k9-i32")[0])[1]  # y
    assert groups(build("gdot-bf16-d129-k1-u32")[0])[2]  # z
    assert groups(build("scatter-f32-d77-i32")[0])[1]
    tiny = build("gws-tiny-constant")[0]
    assert all(a.size < H.MLX_MAX_CONSTANT_ARRAY_SIZE for a in tiny.inputs)
    src = H.capture_source(tiny)
    assert "const constant float* weights [[buffer(0)]]" in src


def test_metal_path_end_to_end_through_harness(monkeypatch):
    """The *_metal wrappers and the custom vjps, with MetalLaunch.run executed by the harness instead of Metal
    (kernels_through_harness, which parity/suite.py also uses, under SAE_EAGER=1 as there): gradients through the
    Metal path equal those of the reference path; outside the context the reference path is back."""
    rng = np.random.default_rng(11)
    n, k, m, d = 9, 3, 13, 77
    acts = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    idx = mx.array(rng.integers(0, m, (n, k)).astype(np.int32))
    weight = mx.array(rng.standard_normal((m, d)).astype(np.float32))
    x = mx.array(rng.standard_normal((n, d)).astype(np.float32))
    c = mx.array(rng.standard_normal((n, d)).astype(np.float32))

    def loss(a, W, xx):
        return (sr.sparse_decode(a, idx, W) * c).sum() + (sr.sparse_encode(xx, W, idx) ** 2).sum()

    v_ref, g_ref = mx.value_and_grad(loss, argnums=(0, 1, 2))(acts, weight, x)
    monkeypatch.setenv("SAE_EAGER", "1")
    with H.kernels_through_harness() as ran:
        v, g = mx.value_and_grad(loss, argnums=(0, 1, 2))(acts, weight, x)
        mx.eval(v, g)
        # bf16 outputs come back as bf16 MLX arrays
        half = sr.gather_weighted_sum(acts.astype(BF16), idx, weight.astype(BF16))
        assert half.dtype == BF16
        with pytest.raises(H.HarnessError, match="mx.compile"):
            mx.compile(lambda a: sr.gather_dot(x * a, weight, idx))(mx.array(1.0))
    assert sorted(set(ran)) == ["sae_gather_dot", "sae_gather_weighted_sum", "sae_scatter_outer"]
    assert not sr.use_metal()
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    for a, b in zip(g, g_ref):
        b = np.array(b)
        assert np.abs(np.array(a) - b).max() <= 1e-5 * np.abs(b).max()
    ref_half = sr.gather_weighted_sum_reference(acts.astype(BF16), idx, weight.astype(BF16))
    np.testing.assert_allclose(to_f64(half), to_f64(ref_half), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# the signature check
# ----------------------------------------------------------------------------------------------------------------


def _small_gws():
    w, idx, table, _ = make_inputs(3, 6, 3, 11, 33, F32, F32, I32)
    return sr.plan_gather_weighted_sum(w, idx, table)


def test_captured_signature_is_what_the_harness_expects():
    launch = _small_gws()
    src = H.capture_source(launch)
    parsed = H.parse_kernel_source(src)
    assert parsed.function_name.startswith("custom_kernel_sae_gather_weighted_sum")
    assert parsed.template_params == (("typename", "OutT"),)
    assert parsed.instantiation == ("float",)
    assert [p.name for p in parsed.params] == [
        "weights", "weights_shape", "indices", "table", "table_shape", "out", "thread_position_in_grid",
    ]
    assert parsed.body == sr.GATHER_WEIGHTED_SUM_SOURCE
    H.check_signature(parsed, launch)  # does not raise


@pytest.mark.parametrize(
    "edit,expect",
    [
        # MLX binds a different dtype than the launch's weights
        (("const device float* weights [[buffer(0)]]", "const device half* weights [[buffer(0)]]"), "parameter 0"),
        # MLX stops passing the shape of `table`
        (("  const constant int* table_shape [[buffer(4)]],\n", ""), "table_shape"),
        # MLX numbers the buffers differently
        (("const device int32_t* indices [[buffer(2)]]", "const device int32_t* indices [[buffer(9)]]"),
         "parameter 2"),
        # MLX orders the inputs differently
        (("const device float* weights [[buffer(0)]],\n  const constant int* weights_shape [[buffer(1)]],\n"
          "  const device int32_t* indices [[buffer(2)]]",
          "const device int32_t* indices [[buffer(0)]],\n  const constant int* weights_shape [[buffer(1)]],\n"
          "  const device float* weights [[buffer(2)]]"), "parameter 0"),
        # a body that is not the kernel's source
        (("acc += float(weights", "acc -= float(weights"), "verbatim"),
        # no edit: the source as captured runs
        (("decltype(", "decltype("), None),
    ],
    ids=["dtype", "missing-shape", "buffer-index", "input-order", "body", "unchanged"],
)
def test_harness_rejects_a_mismatching_signature(edit, expect):
    launch = _small_gws()
    src = H.capture_source(launch)
    old, new = edit
    assert old in src
    bad = src.replace(old, new, 1)
    if expect is None:
        H.run_launch(launch, source=bad)  # an identity edit still runs
        return
    with pytest.raises(H.SignatureMismatch, match=expect) as info:
        H.run_launch(launch, source=bad)
    assert "sae_gather_weighted_sum" in str(info.value)


def test_harness_rejects_unparseable_source_and_wrong_instantiation():
    launch = _small_gws()
    src = H.capture_source(launch)
    with pytest.raises(H.SignatureMismatch, match="cannot parse"):
        H.run_launch(launch, source="kernel void f() {}")
    with pytest.raises(H.SignatureMismatch, match="template instantiation"):
        H.run_launch(launch, source=src.replace("<float>", "<bfloat16_t>"))


# ----------------------------------------------------------------------------------------------------------------
# the harness runtime itself, on toy kernels
# ----------------------------------------------------------------------------------------------------------------


def toy(source, inputs, grid, tg, out_shapes, out_dtypes=None, init_value=None):
    spec = sr.MetalKernelSpec(
        name="harness_toy",
        input_names=tuple(f"in{i}" for i in range(len(inputs))),
        output_names=tuple(f"out{i}" for i in range(len(out_shapes))),
        source=source,
    )
    return sr.MetalLaunch(
        spec=spec, inputs=list(inputs), grid=grid, threadgroup=tg, output_shapes=out_shapes,
        output_dtypes=out_dtypes or [F32] * len(out_shapes), init_value=init_value,
    )


TOY_SIMD = """
    const uint i = thread_position_in_grid.x;
    out0[i] = metal::simd_sum(in0[i]);
    out1[i] = float(thread_index_in_simdgroup) + 100.0f * float(simdgroup_index_in_threadgroup);
"""
TOY_BARRIER = """
    const uint i = thread_position_in_grid.x;
    out0[i] = in0[i] * 2.0f;
    metal::threadgroup_barrier(metal::mem_flags::mem_device);
    out1[i] = out0[i ^ 1u];
"""


def test_toy_simd_sum_and_barrier():
    # simd_sum over SIMD groups of 32 consecutive threads, the last group partial (70 = 64 + 6)
    x = mx.arange(70, dtype=F32)
    s, lanes = H.run_launch(toy(TOY_SIMD, [x], (70, 1, 1), (64, 1, 1), [(70,), (70,)]))
    xs = np.arange(70.0)
    expect = np.concatenate([np.full(32, xs[:32].sum()), np.full(32, xs[32:64].sum()), np.full(6, xs[64:].sum())])
    np.testing.assert_array_equal(s, expect)
    np.testing.assert_array_equal(lanes[[0, 31, 32, 63, 64, 69]], [0, 31, 100, 131, 0, 5])
    # a barrier orders the device-memory writes of a group
    y = mx.arange(64, dtype=F32)
    doubled, swapped = H.run_launch(toy(TOY_BARRIER, [y], (64, 1, 1), (16, 1, 1), [(64,), (64,)]))
    np.testing.assert_array_equal(swapped, (np.arange(64) ^ 1) * 2.0)


@pytest.mark.parametrize(
    "source,tg,error,match",
    [
        ("const uint i = thread_position_in_grid.x; out0[i] = in0[i + 1];", (16, 1, 1), H.KernelFault,
         "past the end of buffer 'in0'"),
        ("const uint i = thread_position_in_grid.x; if (i > 0) { out0[i] = in0[i]; }", (16, 1, 1), H.KernelFault,
         "unwritten"),
        ("const uint i = thread_position_in_grid.x; out0[i] = in0[i]; if (i == 0) { out0[int(i) - 1] = 0.0f; }",
         (16, 1, 1), H.KernelFault, "before the start of buffer 'out0'"),
        ("const uint i = thread_position_in_grid.x; if (i == 3) { return; }\n"
         "metal::threadgroup_barrier(metal::mem_flags::mem_device); out0[i] = in0[i];", (16, 1, 1), H.KernelFault,
         "threadgroup_barrier reached by 15 threads"),
        ("const uint i = thread_position_in_grid.x; float v = 0.0f;\n"
         "if (i < 5) { v = metal::simd_sum(in0[i]); }\n"
         "else { metal::threadgroup_barrier(metal::mem_flags::mem_device); }\n"
         "out0[i] = v;", (16, 1, 1), H.KernelFault, "deadlock"),
        ("threadgroup float buf[4]; const uint i = thread_position_in_grid.x; out0[i] = in0[i];", (16, 1, 1),
         H.HarnessError, "threadgroup memory"),
        ("const uint i = thread_position_in_grid.x; out0[i] = in0[i];", (2048, 1, 1), H.KernelFault,
         "at most 1024"),
    ],
    ids=["oob-read", "unwritten", "write-before", "divergent-barrier", "divergent-simd", "tg-memory", "tg-too-big"],
)
def test_toy_kernel_faults_are_reported(source, tg, error, match):
    launch = toy(source, [mx.arange(40, dtype=F32)], (40, 1, 1), tg, [(40,)])
    with pytest.raises(error, match=match):
        H.run_launch(launch)


def test_init_value_and_bf16_rounding():
    # fp32 -> bf16 conversion in the shim rounds to nearest even, like MLX/ml_dtypes
    vals = np.array([1.0, 1.00390625, 1.01171875, 3.14159, -2.71828, 1e-3, 65504.0, 3.0e38], np.float32)
    src = "const uint i = thread_position_in_grid.x; out0[i] = static_cast<bfloat16_t>(in0[i]); out1[i] += 1.0f;"
    launch = toy(src, [mx.array(vals)], (8, 1, 1), (4, 1, 1), [(8,), (8,)], [BF16, F32], init_value=2.0)
    as_bf16, plus = H.run_launch(launch)
    np.testing.assert_array_equal(as_bf16.view(np.uint16), vals.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(plus, np.full(8, 3.0, np.float32))


def test_harness_catches_indexing_bugs_in_mutated_kernels():
    """Two plausible bugs in copies of our kernels: an off-by-one CSR bound (reads past the end of `offsets`) and
    a wrong lane stride in gather_dot (double-counts columns)."""
    import dataclasses

    w, idx, table, rows = make_inputs(21, 6, 3, 11, 40, F32, F32, I32)
    launch = sr.plan_scatter_outer(w, idx, rows, 11)
    bad_spec = dataclasses.replace(launch.spec, source=launch.spec.source.replace("offsets[m + 1]", "offsets[m + 2]"))
    with pytest.raises(H.KernelFault, match="past the end of buffer 'offsets'"):
        H.run_launch(dataclasses.replace(launch, spec=bad_spec))

    launch = sr.plan_gather_dot(rows, table, idx)
    bad_spec = dataclasses.replace(launch.spec, source=launch.spec.source.replace("c += 32", "c += 31"))
    (got,) = H.run_launch(dataclasses.replace(launch, spec=bad_spec))
    ref = np.array(sr.gather_dot_reference(rows, table, idx))
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()
