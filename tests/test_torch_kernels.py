"""sae_torch.kernels.sparse_rows: references vs float64, Triton (interpreter) vs references, autograd, memory, dispatch.

Triton runs here in its CPU interpreter. triton decides interpreted-vs-compiled when a function is decorated, and
its own helpers (tl.sum, tl.zeros, ...) are decorated when triton is imported, so TRITON_INTERPRET=1 must be set
before the first `import triton` in the process. Our kernels are wrapped lazily, at first use, but if another test
module collected earlier in this process imported triton without the variable, triton's helpers are compiled-mode
objects that raise inside the interpreter. The module therefore checks which state triton is in:
- interpreted (the usual case: this line ran before any import of triton): the Triton tests run in-process;
- not: they are skipped here and `test_interpreter_checks_in_fresh_process` runs them in a fresh interpreter-mode
  pytest subprocess instead (so they are never silently lost).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # noqa: E402  (must precede any triton import, see docstring)

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sae_torch.kernels.sparse_rows as sr

try:
    import triton  # noqa: F401
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAVE_TRITON = True
    TRITON_INTERPRETED = isinstance(tl.zeros, InterpretedFunction) and sr._interpreting()
except Exception:  # triton missing or too different
    HAVE_TRITON = False
    TRITON_INTERPRETED = False

_IN_SUBPROCESS = os.environ.get("_SAE_KERNEL_TESTS_SUBPROCESS") == "1"

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
triton_here = pytest.mark.skipif(
    HAVE_TRITON and not TRITON_INTERPRETED,
    reason="triton was imported in this process before TRITON_INTERPRET=1 was set; these checks run in a fresh "
    "process instead (test_interpreter_checks_in_fresh_process)",
)


def triton_test(fn):
    return needs_triton(triton_here(fn))


# ---------------------------------------------------------------------------------------------------------------
# Data and float64 oracles
# ---------------------------------------------------------------------------------------------------------------

BF16 = torch.bfloat16
F32 = torch.float32


def unused_latent(m):
    """The latent `make_indices` never draws (its scatter_outer output row must be zero), or None when m <= 5."""
    return m - 2 if m > 5 else None


def make_indices(n, k, m, idx_dtype=torch.int64, seed=0, noncontig=False):
    """Random latents with repeats inside rows and across rows, one heavy latent (3 on half the tokens), the first
    and the last latent always present (latent m - 1 on the last token, latent 0 on the first: an off-by-one in a
    kernel's index bound drops one of them), and latent `unused_latent(m)` never used."""
    g = torch.Generator().manual_seed(seed)
    empty = unused_latent(m)
    idx = torch.randint(0, m - (empty is not None), (n, k), generator=g)
    if empty is not None:
        idx[idx >= empty] += 1  # [0, m) without the unused latent
    if k > 1:
        idx[:, -1] = idx[:, 0]  # repeated within a row
    if m > 4:
        idx[: n // 2, 0] = 3  # heavy latent
    idx[-1, 0] = m - 1
    idx[0, -1] = 0
    idx = idx.to(idx_dtype)
    if noncontig:
        idx = idx.t().contiguous().t()
        assert not idx.is_contiguous() or min(n, k) == 1
    return idx


def test_make_indices_covers_the_first_and_last_latent():
    """Every kernel test's indices hold latent 0 and latent M - 1 (and leave one latent unused)."""
    shapes = [s[:3] for s in REF_SHAPES] + [c[1][:3] for c in TRITON_CASES] + [(5, 3, 6), (48, 4, 11), (8, 3, 9)]
    for n, k, m in shapes:
        idx = make_indices(n, k, m)
        assert idx.min() == 0 and idx.max() == m - 1, (n, k, m)
        if unused_latent(m) is not None:
            assert not (idx == unused_latent(m)).any(), (n, k, m)


def rand(shape, dtype=F32, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # a strided view: every other column of a twice-as-wide tensor
        a, b = shape
        t = torch.randn(a, 2 * b, generator=g)[:, ::2]
    else:
        t = torch.randn(*shape, generator=g)
    return t.to(dtype)


def naive_gws(w, idx, table):
    return torch.einsum("nk,nkd->nd", w.double(), table.double()[idx.long()])


def naive_gdot(rows, table, idx):
    return torch.einsum("nd,nkd->nk", rows.double(), table.double()[idx.long()])


def naive_scatter(w, idx, rows, m):
    d = rows.shape[1]
    contrib = (w.double()[..., None] * rows.double()[:, None, :]).reshape(-1, d)  # N*k*d: fine for an oracle
    return torch.zeros(m, d, dtype=torch.float64).index_add_(0, idx.reshape(-1).long(), contrib)


def assert_fp32_close(out, ref, rel=1e-5):
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"max|diff| {err:.3g} > {rel:g} * max|ref| {scale:.3g}"


def assert_bf16_close(out, exact, rounding=2.0**-8):
    """Reduced-precision output with fp32 accumulation: every element within one final bf16 rounding of the exact
    float64 value (2^-8 relative for round-to-nearest), plus a tiny slack for fp32 summation order. A bf16
    accumulator fails this.

    Triton's interpreter casts fp32 -> bf16 by truncation (compiled Triton rounds to nearest even), so its outputs
    are checked with rounding=2^-7 (one whole bf16 ulp)."""
    assert out.dtype == BF16
    scale = exact.abs().max().item() or 1.0
    err = (out.double() - exact).abs()
    bound = rounding * exact.abs() + 1e-5 * scale
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} elements off by more than a bf16 rounding; worst {err.max().item():.3g}"


TRITON_BF16_ROUNDING = 2.0**-7  # the interpreter truncates fp32 -> bf16, see assert_bf16_close


# ---------------------------------------------------------------------------------------------------------------
# References vs float64
# ---------------------------------------------------------------------------------------------------------------

REF_SHAPES = [  # (N, k, M, d)
    (33, 1, 10, 77),
    (64, 7, 37, 129),
    (40, 32, 300, 64),
]


@pytest.mark.parametrize("shape", REF_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_references_match_float64(shape, dtype, idx_dtype):
    n, k, m, d = shape
    idx = make_indices(n, k, m, idx_dtype, seed=1)
    w, table, rows = rand((n, k), dtype, 2), rand((m, d), dtype, 3), rand((n, d), dtype, 4)
    check = assert_fp32_close if dtype == F32 else assert_bf16_close

    out = sr.gather_weighted_sum_reference(w, idx, table)
    assert out.shape == (n, d) and out.dtype == dtype
    check(out, naive_gws(w, idx, table))

    out = sr.gather_dot_reference(rows, table, idx)
    assert out.shape == (n, k) and out.dtype == dtype
    check(out, naive_gdot(rows, table, idx))

    out = sr.scatter_outer_reference(w, idx, rows, m)
    assert out.shape == (m, d) and out.dtype == dtype
    check(out, naive_scatter(w, idx, rows, m))
    assert (out[unused_latent(m)] == 0).all()  # latent never used


def test_references_chunked_gather_dot(monkeypatch):
    """gather_dot_reference processes tokens in chunks; force many small chunks."""
    monkeypatch.setattr(sr, "_REF_CHUNK_ELEMS", 100)
    n, k, m, d = 37, 5, 20, 33
    idx = make_indices(n, k, m, seed=2)
    rows, table = rand((n, d), seed=5), rand((m, d), seed=6)
    assert_fp32_close(sr.gather_dot_reference(rows, table, idx), naive_gdot(rows, table, idx))


def test_references_mixed_dtypes_and_noncontiguous():
    n, k, m, d = 24, 6, 19, 45
    idx = make_indices(n, k, m, noncontig=True)
    w = rand((n, k), F32, 1, noncontig=True)
    table = rand((m, d), BF16, 2, noncontig=True)
    rows = rand((n, d), BF16, 3, noncontig=True)
    out = sr.gather_weighted_sum_reference(w, idx, table)
    assert out.dtype == F32  # result_type(fp32, bf16)
    assert_fp32_close(out, naive_gws(w, idx, table))
    out = sr.gather_dot_reference(rows.float(), table, idx)
    assert out.dtype == F32
    assert_fp32_close(out, naive_gdot(rows.float(), table, idx))
    out = sr.scatter_outer_reference(w, idx, rows, m)
    assert out.dtype == F32
    assert_fp32_close(out, naive_scatter(w, idx, rows, m))
    out = sr.scatter_outer_reference(w.to(BF16), idx, rows, m)
    assert out.dtype == BF16
    assert_bf16_close(out, naive_scatter(w.to(BF16), idx, rows, m))


def test_references_empty_and_edge_shapes():
    idx = torch.zeros(0, 4, dtype=torch.int64)
    assert sr.gather_weighted_sum_reference(torch.zeros(0, 4), idx, torch.randn(5, 3)).shape == (0, 3)
    assert sr.gather_dot_reference(torch.zeros(0, 3), torch.randn(5, 3), idx).shape == (0, 4)
    out = sr.scatter_outer_reference(torch.zeros(0, 4), idx, torch.zeros(0, 3), 5)
    assert out.shape == (5, 3) and (out == 0).all()


def test_scatter_outer_reference_rejects_out_of_range():
    idx = torch.tensor([[0, 5]])
    with pytest.raises(IndexError):
        sr.scatter_outer_reference(torch.ones(1, 2), idx, torch.ones(1, 3), 5)
    with pytest.raises(IndexError):
        sr.scatter_outer_reference(torch.ones(1, 2), -idx, torch.ones(1, 3), 5)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "dispatch"])
def test_shape_validation(impl):
    f = {
        name: getattr(sr, name if impl == "dispatch" else f"{name}_reference")
        for name in ("gather_weighted_sum", "gather_dot", "scatter_outer")
    }
    w, idx, table, rows = torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.long), torch.ones(9, 5), torch.ones(4, 5)
    with pytest.raises(ValueError, match="same shape"):
        f["gather_weighted_sum"](torch.ones(4, 2), idx, table)
    with pytest.raises(ValueError, match="int32 or int64"):
        f["gather_weighted_sum"](w, idx.float(), table)
    with pytest.raises(ValueError, match="2-D"):
        f["gather_weighted_sum"](w, idx, table[0])
    with pytest.raises(ValueError, match="disagree on d"):
        f["gather_dot"](torch.ones(4, 6), table, idx)
    with pytest.raises(ValueError, match="disagree on N"):
        f["gather_dot"](torch.ones(5, 5), table, idx)
    with pytest.raises(ValueError, match="same shape"):
        f["scatter_outer"](torch.ones(4, 2), idx, rows, 9)
    with pytest.raises(ValueError, match="disagree on N"):
        f["scatter_outer"](w, idx, torch.ones(3, 5), 9)
    with pytest.raises(ValueError, match="num_rows"):
        f["scatter_outer"](w, idx, rows, -1)
    with pytest.raises(ValueError, match="floating-point"):
        f["scatter_outer"](w.long(), idx, rows, 9)


# ---------------------------------------------------------------------------------------------------------------
# Autograd (reference path: everything on CPU dispatches to the references)
# ---------------------------------------------------------------------------------------------------------------


def test_gradcheck_float64():
    n, k, m, d = 5, 3, 6, 4
    idx = make_indices(n, k, m, seed=3)
    acts = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: sr.sparse_decode(a, idx, w), (acts, weight))
    assert torch.autograd.gradcheck(lambda x_, w: sr.sparse_encode(x_, w, idx), (x, weight))
    assert torch.autograd.gradcheck(lambda a, w: sr.sparse_decode(a, idx.int(), w), (acts, weight))


@pytest.mark.parametrize("which", ["decode", "encode"])
def test_autograd_matches_dense_autograd(which):
    n, k, m, d = 20, 4, 13, 31
    idx = make_indices(n, k, m, seed=4)
    weight = rand((m, d), seed=1).requires_grad_()
    first = rand((n, k) if which == "decode" else (n, d), seed=2).requires_grad_()
    gout = rand((n, d) if which == "decode" else (n, k), seed=3)
    if which == "decode":
        ours = sr.sparse_decode(first, idx, weight)
        dense = torch.einsum("nk,nkd->nd", first, weight[idx])
    else:
        ours = sr.sparse_encode(first, weight, idx)
        dense = torch.einsum("nd,nkd->nk", first, weight[idx])
    g1 = torch.autograd.grad(ours, (first, weight), gout)
    g2 = torch.autograd.grad(dense, (first, weight), gout)
    assert_fp32_close(ours, dense)
    for a, b in zip(g1, g2):
        assert a.dtype == F32
        assert_fp32_close(a, b)


def test_autograd_needs_input_grad_and_dtypes(monkeypatch):
    """Only the requested grads are computed; grads come back in their input's dtype (mixed fp32/bf16)."""
    calls = []
    for name in ("gather_dot", "scatter_outer", "gather_weighted_sum"):
        real = getattr(sr, name)
        monkeypatch.setattr(sr, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    n, k, m, d = 8, 3, 9, 10
    idx = make_indices(n, k, m)
    acts = rand((n, k), F32).requires_grad_()
    weight = rand((m, d), BF16)  # no grad
    out = sr.sparse_decode(acts, idx, weight)
    assert out.dtype == F32
    calls.clear()
    out.sum().backward()
    assert calls == ["gather_dot"] and acts.grad.dtype == F32
    weight.requires_grad_()
    acts.grad = None
    acts.requires_grad_(False)
    out = sr.sparse_decode(acts, idx, weight)
    calls.clear()
    out.sum().backward()
    assert calls == ["scatter_outer"] and weight.grad.dtype == BF16 and acts.grad is None

    x = rand((n, d), BF16).requires_grad_()
    w32 = rand((m, d), F32)
    pre = sr.sparse_encode(x, w32, idx)
    assert pre.dtype == F32
    calls.clear()
    pre.sum().backward()
    assert calls == ["gather_weighted_sum"] and x.grad.dtype == BF16


# ---------------------------------------------------------------------------------------------------------------
# scatter_outer_reference memory: no N*k*d temporary, no dense [N, M]
# ---------------------------------------------------------------------------------------------------------------


class _LargestOpOutput(TorchDispatchMode):
    """Largest strided tensor (in elements) produced by any aten op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


def _naive_scatter_fp32(w, idx, rows, m):  # the formulation the check must catch
    contrib = (w[..., None] * rows[:, None, :]).reshape(-1, rows.shape[1])
    return torch.zeros(m, rows.shape[1]).index_add_(0, idx.reshape(-1), contrib)


def test_scatter_outer_reference_memory():
    # N*k*d = 4M elements, 16x larger than anything legitimate (N*d = 64K, M*d = 256K, N*k = 16K).
    n, k, m, d = 256, 64, 1000, 256
    idx = make_indices(n, k, m, seed=7)
    w, rows = rand((n, k), seed=1), rand((n, d), seed=2)
    limit = n * k * d // 8

    # (1) every op's output, as seen by the dispatcher (catches any materialised temporary tensor)
    with _LargestOpOutput() as mode:
        sr.scatter_outer_reference(w, idx, rows, m)
    assert mode.largest <= max(m, n) * d < limit, mode.largest
    with _LargestOpOutput() as mode:  # positive control: the check does see an N*k*d temporary
        _naive_scatter_fp32(w, idx, rows, m)
    assert mode.largest >= n * k * d

    # (2) the CPU allocator, through the profiler (also sees scratch allocated inside kernels)
    from torch.profiler import ProfilerActivity, profile

    def biggest_alloc(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(w, idx, rows, m)
        return max(e.cpu_memory_usage for e in prof.events())

    ours = biggest_alloc(sr.scatter_outer_reference)
    assert 0 < ours < limit * 4, ours  # bytes, fp32
    assert biggest_alloc(_naive_scatter_fp32) >= n * k * d * 4  # positive control


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


class _FakeCuda:
    is_cuda = True


def test_use_triton(monkeypatch):
    monkeypatch.setattr(sr, "HAS_TRITON", True)
    monkeypatch.delenv("SAE_EAGER", raising=False)
    monkeypatch.delenv("SAE_TRITON_CPU", raising=False)
    assert sr.use_triton(_FakeCuda())
    assert not sr.use_triton(torch.zeros(1))  # CPU tensor
    for value, expect in [("", True), ("0", True), ("1", False), ("yes", False)]:
        monkeypatch.setenv("SAE_EAGER", value)
        assert sr.use_triton(_FakeCuda()) is expect, value
    monkeypatch.delenv("SAE_EAGER")
    # opt-in for the interpreter on CPU: needs both SAE_TRITON_CPU=1 and TRITON_INTERPRET=1
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not sr.use_triton(cpu)
    monkeypatch.setenv("SAE_TRITON_CPU", "1")
    assert sr.use_triton(cpu)
    monkeypatch.setenv("SAE_EAGER", "1")
    assert not sr.use_triton(cpu)
    monkeypatch.delenv("SAE_EAGER")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not sr.use_triton(cpu)
    monkeypatch.delenv("SAE_TRITON_CPU")
    monkeypatch.setattr(sr, "HAS_TRITON", False)
    assert not sr.use_triton(_FakeCuda())


@pytest.mark.parametrize("eager", [None, "0", "1"])
def test_dispatch_respects_sae_eager(monkeypatch, eager):
    """With tensors that claim to be on CUDA, the plain-named functions and the autograd functions call the
    Triton versions unless SAE_EAGER is set (to something other than "0"); spies record which ran."""
    calls = []
    for name in ("gather_weighted_sum", "gather_dot", "scatter_outer"):
        ref = getattr(sr, f"{name}_reference")
        monkeypatch.setattr(sr, f"{name}_reference", lambda *a, _r=ref, _n=name: calls.append(("ref", _n)) or _r(*a))
        monkeypatch.setattr(sr, f"{name}_triton",
                            lambda *a, _r=ref, _n=name, **options: calls.append(("triton", _n)) or _r(*a))
    monkeypatch.setattr(sr, "HAS_TRITON", True)
    monkeypatch.delenv("SAE_TRITON_CPU", raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    if eager is None:
        monkeypatch.delenv("SAE_EAGER", raising=False)
    else:
        monkeypatch.setenv("SAE_EAGER", eager)
    expect = "ref" if eager == "1" else "triton"

    n, k, m, d = 5, 2, 6, 4
    idx = make_indices(n, k, m)
    acts, weight, x = rand((n, k)).requires_grad_(), rand((m, d)).requires_grad_(), rand((n, d)).requires_grad_()
    sr.sparse_decode(acts, idx, weight).sum().backward()
    sr.sparse_encode(x, weight, idx).sum().backward()
    assert calls == [
        (expect, "gather_weighted_sum"), (expect, "gather_dot"), (expect, "scatter_outer"),
        (expect, "gather_dot"), (expect, "gather_weighted_sum"), (expect, "scatter_outer"),
    ]


def test_triton_functions_refuse_cpu_without_interpreter(monkeypatch):
    if not sr.HAS_TRITON:
        with pytest.raises(RuntimeError, match="triton is not installed"):
            sr.gather_dot_triton(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2, 1, dtype=torch.long))
        return
    monkeypatch.setattr(sr, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        sr.gather_dot_triton(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2, 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter) vs references
# ---------------------------------------------------------------------------------------------------------------
# The interpreter costs a few ms per program, so shapes are small and blocks wide; some cases force small blocks
# to exercise the loops and the masked tails (d-blocks, k-blocks, occurrence chunks, heavy-latent segments).

TRITON_CASES = [
    # id, (N, k, M, d), dtype, idx dtype, noncontig, block kwargs
    ("k1_d77_i32", (9, 1, 37, 77), F32, torch.int32, False, {}),
    ("d129_blocks", (12, 8, 37, 129), F32, torch.int64, False, {"block_d": 64}),
    ("k40_kblocks", (6, 40, 29, 33), F32, torch.int32, False, {"block_k": 16}),
    ("noncontig", (10, 5, 23, 45), F32, torch.int64, True, {}),
    ("bf16_i32", (16, 6, 41, 77), BF16, torch.int32, False, {}),
    ("bf16_noncontig_blocks", (12, 20, 19, 129), BF16, torch.int64, True, {"block_d": 64, "block_k": 16}),
]


def _case(case):
    _, (n, k, m, d), dtype, idx_dtype, noncontig, blocks = case
    idx = make_indices(n, k, m, idx_dtype, seed=n + k, noncontig=noncontig)
    w = rand((n, k), dtype, 1, noncontig)
    table = rand((m, d), dtype, 2, noncontig)
    rows = rand((n, d), dtype, 3, noncontig)
    return (n, k, m, d), dtype, idx, w, table, rows, blocks


def _check(out, ref_out, exact, dtype):
    assert out.dtype == ref_out.dtype == dtype and out.shape == ref_out.shape
    if dtype == F32:
        assert_fp32_close(out, ref_out)
        assert_fp32_close(out, exact)
    else:
        assert_bf16_close(out, exact, TRITON_BF16_ROUNDING)
        assert_bf16_close(ref_out, exact)


@triton_test
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_gather_weighted_sum(case):
    (n, k, m, d), dtype, idx, w, table, _, blocks = _case(case)
    out = sr.gather_weighted_sum_triton(w, idx, table, **blocks)
    _check(out, sr.gather_weighted_sum_reference(w, idx, table), naive_gws(w, idx, table), dtype)


@triton_test
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_gather_dot(case):
    (n, k, m, d), dtype, idx, _, table, rows, blocks = _case(case)
    out = sr.gather_dot_triton(rows, table, idx, **blocks)
    _check(out, sr.gather_dot_reference(rows, table, idx), naive_gdot(rows, table, idx), dtype)


SCATTER_BLOCKS = {  # small chunks / segments: multi-chunk loops, and the heavy path where a latent has > seg
    "k1_d77_i32": {},
    "d129_blocks": {"block_p": 4, "seg": 8},  # max count 10: heavy, 2 chunks per segment
    "k40_kblocks": {"block_p": 8, "seg": 8},  # max count 13: heavy
    "noncontig": {},
    "bf16_i32": {"block_p": 4, "seg": 8},  # max count 10: heavy, bf16
    "bf16_noncontig_blocks": {"block_d": 64, "block_p": 16, "seg": 32},
}


@triton_test
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_scatter_outer(case):
    (n, k, m, d), dtype, idx, w, _, rows, _ = _case(case)
    blocks = SCATTER_BLOCKS[case[0]]
    out = sr.scatter_outer_triton(w, idx, rows, m, **blocks)
    _check(out, sr.scatter_outer_reference(w, idx, rows, m), naive_scatter(w, idx, rows, m), dtype)
    assert (out[unused_latent(m)] == 0).all()  # latent without occurrences


@triton_test
def test_triton_scatter_outer_heavy_latents():
    """Several latents with many more occurrences than a segment (split over programs, fp32 atomics into the
    heavy buffer, then cast into the output), next to light and empty latents; bf16 output."""
    n, k, m, d = 48, 4, 11, 40
    idx = make_indices(n, k, m, seed=9)
    idx[:, 1] = 5  # 48 occurrences
    idx[:30, 2] = 7  # 30 more
    w, rows = rand((n, k), BF16, 1), rand((n, d), BF16, 2)
    counts = torch.bincount(idx.reshape(-1), minlength=m)
    assert (counts > 16).sum() >= 3 and counts[unused_latent(m)] == 0
    out = sr.scatter_outer_triton(w, idx, rows, m, block_p=16, seg=16)
    assert_bf16_close(out, naive_scatter(w, idx, rows, m), TRITON_BF16_ROUNDING)
    out32 = sr.scatter_outer_triton(w.float(), idx, rows.float(), m, block_p=16, seg=16)
    assert_fp32_close(out32, naive_scatter(w, idx, rows, m))


@triton_test
def test_triton_mixed_dtypes():
    n, k, m, d = 8, 3, 17, 20
    idx = make_indices(n, k, m)
    w32, table16, rows16 = rand((n, k), F32, 1), rand((m, d), BF16, 2), rand((n, d), BF16, 3)
    out = sr.gather_weighted_sum_triton(w32, idx, table16)
    assert out.dtype == F32
    assert_fp32_close(out, naive_gws(w32, idx, table16))
    out = sr.gather_dot_triton(rows16, table16.float(), idx)
    assert out.dtype == F32
    assert_fp32_close(out, naive_gdot(rows16, table16, idx))
    out = sr.scatter_outer_triton(w32, idx, rows16, m)
    assert out.dtype == F32
    assert_fp32_close(out, naive_scatter(w32, idx, rows16, m))


@triton_test
def test_triton_validation():
    idx = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        sr.gather_weighted_sum_triton(torch.ones(4, 2), idx, torch.ones(9, 5))
    with pytest.raises(ValueError, match="disagree on d"):
        sr.gather_dot_triton(torch.ones(4, 6), torch.ones(9, 5), idx)
    with pytest.raises(ValueError, match="seg"):
        sr.scatter_outer_triton(torch.ones(4, 3), idx, torch.ones(4, 5), 9, block_p=16, seg=24)
    with pytest.raises(ValueError, match="power of two"):
        sr.gather_dot_triton(torch.ones(4, 5), torch.ones(9, 5), idx, block_d=48)


@triton_test
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_triton_autograd_matches_reference(monkeypatch, dtype):
    """sparse_decode / sparse_encode forward and backward through the Triton kernels (dispatch forced for CPU
    tensors) against the same through the references."""
    n, k, m, d = 12, 5, 21, 77
    idx = make_indices(n, k, m, torch.int32, seed=11)
    base = {
        "acts": rand((n, k), dtype, 1), "x": rand((n, d), dtype, 2), "weight": rand((m, d), dtype, 3),
        "g_dec": rand((n, d), dtype, 4), "g_enc": rand((n, k), dtype, 5),
    }

    def run():
        acts = base["acts"].clone().requires_grad_()
        x = base["x"].clone().requires_grad_()
        w1 = base["weight"].clone().requires_grad_()
        w2 = base["weight"].clone().requires_grad_()
        y = sr.sparse_decode(acts, idx, w1)
        y.backward(base["g_dec"])
        pre = sr.sparse_encode(x, w2, idx)
        pre.backward(base["g_enc"])
        return {"y": y, "d_acts": acts.grad, "d_w_dec": w1.grad, "pre": pre, "d_x": x.grad, "d_w_enc": w2.grad}

    ref = run()
    monkeypatch.setattr(sr, "use_triton", lambda t: True)
    tri = run()
    for key in ref:
        assert tri[key].dtype == dtype, key
        if dtype == F32:
            assert_fp32_close(tri[key], ref[key])
        else:  # each side is one bf16 rounding (the interpreter's: a truncation) from the same fp32 value
            scale = ref[key].double().abs().max().item()
            err = (tri[key].double() - ref[key].double()).abs().max().item()
            assert err <= 1.5 * 2.0**-7 * scale, (key, err, scale)


@triton_test
def test_triton_ignores_out_of_range_indices():
    """The kernels never read outside the table: an out-of-range index contributes nothing (no host-side check)."""
    idx = torch.tensor([[0, 9], [-1, 2]])
    w, table, rows = torch.ones(2, 2), torch.arange(12.0).reshape(4, 3), torch.ones(2, 3)
    out = sr.gather_weighted_sum_triton(w, idx, table)
    assert torch.equal(out, torch.stack([table[0], table[2]]))
    assert torch.equal(sr.gather_dot_triton(rows, table, idx), torch.tensor([[3.0, 0.0], [0.0, 21.0]]))
    out = sr.scatter_outer_triton(w, idx, rows, 4)
    assert torch.equal(out, torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3]))


@triton_test
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_scatter_outer_dot(case):
    """The tensor-core segment reduction (kernel="dot"): runs of latents inside a block (stores) and across
    blocks (atomics at the edges), the heavy latent over several blocks, the unused latent zero."""
    (n, k, m, d), dtype, idx, w, _, rows, _ = _case(case)
    block_p = 16 if n * k > 16 else None  # several blocks of occurrences where there are enough
    out = sr.scatter_outer_triton(w, idx, rows, m, kernel="dot", block_p=block_p)
    _check(out, sr.scatter_outer_reference(w, idx, rows, m), naive_scatter(w, idx, rows, m), dtype)
    if unused_latent(m) is not None:
        assert (out[unused_latent(m)] == 0).all()


@triton_test
def test_triton_scatter_outer_dot_rejects_small_blocks_and_unknown_kernels():
    idx = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 16"):
        sr.scatter_outer_triton(torch.ones(4, 3), idx, torch.ones(4, 5), 9, kernel="dot", block_p=8)
    with pytest.raises(ValueError, match="kernel must be one of"):
        sr.scatter_outer_triton(torch.ones(4, 3), idx, torch.ones(4, 5), 9, kernel="csr")


# ---- the one-read top-k (kernels/topk.py) against torch.topk ----

def _check_selection(values, indices, act, k, allowed=None):
    """A valid top-k of `act` (restricted to `allowed` columns): distinct columns, the values found there, and the
    same multiset of values as torch.topk's (ties may pick other columns)."""
    pool = act if allowed is None else act.masked_fill(~allowed, float("-inf"))
    expect = pool.topk(k, dim=-1).values
    assert indices.dtype == torch.int64 and values.dtype == act.dtype and values.shape == (act.shape[0], k)
    assert torch.equal(values.sort(-1, descending=True).values, expect)
    assert torch.equal(act.gather(-1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)
    if allowed is not None:
        assert allowed[indices].all()


TOPK_CASES = [
    # id, (N, M, k), tile, block_n, method
    ("one_tile", (5, 70, 7), None, None, "max"),
    ("k1_odd_width", (6, 53, 1), 16, 2, "max"),
    ("tiles_and_merges", (9, 300, 6), 16, 4, "max"),  # 19 tiles of 16 -> 114 candidates -> merge passes
    ("k_equals_tile", (4, 40, 16), 16, 4, "max"),
    ("bitonic_tiny", (3, 24, 3), 8, 4, "bitonic"),  # tl.topk: very slow in the interpreter, so tiny
]


@triton_test
@pytest.mark.parametrize("case", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_triton_select_topk(case, dtype):
    from sae_torch.kernels.topk import select_topk_reference, select_topk_triton

    _, (n, m, k), tile, block_n, method = case
    g = torch.Generator().manual_seed(n * m + k)
    pre = torch.randn(n, m, generator=g).to(dtype)
    pre[0, : m // 2] = pre[0, m // 2]  # ties: half a row holds one value
    pre[1] = -pre[1].abs()  # a row without a positive value: ReLU leaves only zeros to choose from
    pre[2, 3] = 0.5  # fewer than k positive values in this row (k > 1)
    pre[2, :3] = -1.0
    pre[2, 4:] = -pre[2, 4:].abs()
    # bias: fp32 only (the kernel adds in fp32 and rounds the sum to the input's dtype, which the interpreter does
    # by truncation); bf16 checks that upcast values come back exactly
    bias = (0.1 * torch.randn(m, generator=g)) if dtype == F32 else None
    mask = torch.rand(m, generator=g) < 0.4
    k_aux = min(5, int(mask.sum()))
    sel = select_topk_triton(pre, k, bias=bias, aux_mask=mask, k_aux=k_aux, tile=tile, block_n=block_n,
                             method=method)
    act = (pre if bias is None else pre + bias).relu()
    _check_selection(sel.values, sel.indices, act, k)
    _check_selection(sel.aux_values, sel.aux_indices, act, k_aux, allowed=mask)
    plain = select_topk_triton(pre, k, relu=False, tile=tile, block_n=block_n, method=method)
    assert plain.aux_values is None
    _check_selection(plain.values, plain.indices, pre, k)
    ref = select_topk_reference(pre, k, relu=False)
    assert torch.equal(plain.values.sort(-1).values, ref.values.sort(-1).values)


@triton_test
def test_triton_select_topk_validation():
    from sae_torch.kernels.topk import select_topk_triton

    pre = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k must lie"):
        select_topk_triton(pre, 11)
    with pytest.raises(ValueError, match="aux_mask"):
        select_topk_triton(pre, 2, aux_mask=torch.ones(9, dtype=torch.bool), k_aux=1)
    with pytest.raises(ValueError, match="method"):
        select_topk_triton(pre, 2, method="radix")


@triton_test
@pytest.mark.parametrize("multi_topk, aux_ratio", [(False, 8.0), (True, 0.0)],
                         ids=["topk_dense_auxk", "multi_topk_sparse_auxk"])  # each about 20-40 s interpreted
def test_triton_fused_selection_coder_matches_torch_selection(monkeypatch, multi_topk, aux_ratio):
    """SparseCoder with selection_kernel="triton" (the one-read top-k, all kernels in the interpreter) against the
    default torch selection: same losses and gradients (both AuxK paths; Multi-TopK), dense autograd-free."""
    from sae_core.config import SparseCoderConfig
    from sae_torch import SparseCoder

    monkeypatch.setenv("SAE_TRITON_CPU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d, n = 16, 24
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(k=4, expansion_factor=4, multi_topk=multi_topk))
    x = torch.randn(n, d)
    sae.aux_dense_max_ratio, sae.aux_dense_max_fraction = aux_ratio, 1.0  # ratio 0: the sparse AuxK path
    dead = torch.rand(sae.num_latents, generator=torch.Generator().manual_seed(1)) < 0.3
    assert int(dead.sum()) > d // 2  # k_aux = d // 2 of them
    assert sae.aux_takes_dense_path(int(dead.sum()), d // 2) == (aux_ratio > 0)

    def run(kernel):
        sae.zero_grad()
        sae.selection_kernel = kernel
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
        return out, {name: p.grad.clone() for name, p in sae.named_parameters()}

    ref, ref_grads = run("torch")
    tri, tri_grads = run("triton")
    for name in ("fvu", "auxk_loss", "multi_topk_fvu"):
        assert_fp32_close(getattr(tri, name).reshape(1), getattr(ref, name).reshape(1))
    assert torch.equal(tri.latent_indices.sort(-1).values, ref.latent_indices.sort(-1).values)
    for name, grad in ref_grads.items():
        assert_fp32_close(tri_grads[name], grad, rel=1e-5)
    sae.selection_kernel = "fastest"
    with pytest.raises(ValueError, match="selection_kernel"):
        sae(x)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
@pytest.mark.skipif(TRITON_INTERPRETED or _IN_SUBPROCESS, reason="the Triton checks ran in this process")
def test_interpreter_checks_in_fresh_process():
    """Fallback when triton was imported here before TRITON_INTERPRET=1: run the Triton tests in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", _SAE_KERNEL_TESTS_SUBPROCESS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-k", "triton_",
         str(Path(__file__).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# The real compiler (no GPU needed): AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin for sm_90 with the bundled ptxas.
# Catches what the interpreter cannot (typing of loop bounds, masks, scalar stores, atomics). Runs in a fresh
# process without TRITON_INTERPRET, since this one may have triton in interpreter mode.
# ---------------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
except Exception as exc:
    print("SKIP: this triton has no ASTSource/GPUTarget:", repr(exc)); sys.exit(0)
import sae_torch.kernels.sparse_rows as sr
ks = sr._kernels()
assert not sr._interpreting()

def compile_(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4})
    assert kernel.asm.get("cubin"), fn
    print("compiled", fn.__name__, sig)

for dt, it in [("bf16", "i32")]:  # one set keeps this test short; fp32 / int64 only change load/store widths
    compile_(ks.gws, {"w_ptr": "*" + dt, "idx_ptr": "*" + it, "table_ptr": "*" + dt, "out_ptr": "*" + dt,
                      "K": "i32", "D": "i32", "M": "i32"}, {"BLOCK_K": 32, "BLOCK_D": 128})
    compile_(ks.gdot, {"rows_ptr": "*" + dt, "table_ptr": "*" + dt, "idx_ptr": "*" + it, "out_ptr": "*" + dt,
                       "K": "i32", "D": "i32", "M": "i32"}, {"BLOCK_K": 32, "BLOCK_D": 128})
    compile_(ks.scatter, {"w_ptr": "*" + dt, "order_ptr": "*i64", "offsets_ptr": "*i64", "item_latent_ptr": "*i64",
                          "seg_first_ptr": "*i64", "heavy_rank_ptr": "*i64", "heavy_map_ptr": "*i64",
                          "heavy_buf_ptr": "*fp32", "rows_ptr": "*" + dt, "out_ptr": "*" + dt,
                          "K": "i32", "D": "i32", "M": "i32"}, {"SEG": 256, "BLOCK_P": 16, "BLOCK_D": 128})
    compile_(ks.scatter_finalize, {"heavy_map_ptr": "*i64", "heavy_buf_ptr": "*fp32", "out_ptr": "*" + dt,
                                   "D": "i32"}, {"BLOCK_D": 128})
for dt, native in [("bf16", True), ("fp32", False)]:  # tensor-core bf16 dot; full-precision fp32 dot
    compile_(ks.scatter_dot, {"w_ptr": "*" + dt, "order_ptr": "*i64", "lat_ptr": "*i64", "rows_ptr": "*" + dt,
                              "out_ptr": "*fp32", "NK": "i32", "K": "i32", "D": "i32"},
             {"BLOCK_P": 64, "BLOCK_D": 128, "NATIVE_DOT": native})
import sae_torch.kernels.topk as tk
tiles, merge = tk._kernels()
for bitonic in (False, True):
    compile_(tiles, {"pre_ptr": "*bf16", "bias_ptr": "*bf16", "mask_ptr": "*i8", "keys_ptr": "*i64",
                     "aux_keys_ptr": "*i64", "N": "i32", "M": "i32", "stride": "i32"},
             {"HAS_BIAS": False, "RELU": True, "TILE": 1024, "K_PAD": 64, "KA_PAD": 512, "BLOCK_N": 1,
              "BITONIC": bitonic})
    compile_(merge, {"keys_ptr": "*i64", "out_ptr": "*i64", "N": "i32", "C": "i32"},
             {"TILE": 1024, "K_PAD": 64, "BLOCK_N": 1, "BITONIC": bitonic})
print("ALL COMPILED")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
@pytest.mark.skipif(_IN_SUBPROCESS, reason="run by the parent process")
def test_kernels_compile_for_sm90():
    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 0 and proc.stdout.startswith("SKIP:"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "ALL COMPILED" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


# ---- row_subset: AuxK over the dead rows with dense GEMMs, against plain autograd ----

def _subset_inputs(dtype, seed=0, n=29, d_in=13, d_out=11, m=40, rows=9, per_token=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    w_enc = (torch.randn(m, d_in, generator=g) / d_in**0.5).to(dtype)
    b_enc = (0.1 * torch.randn(m, generator=g)).to(dtype)
    w_dec = torch.randn(m, d_out, generator=g).to(dtype)
    subset = torch.randperm(m, generator=g)[:rows]
    exact = torch.float64 if dtype == torch.float64 else F32
    pre = (x.to(exact) @ w_enc[subset].to(exact).T + b_enc[subset].to(exact)).relu()
    slots = pre.topk(per_token, dim=-1).indices  # some chosen slots hold 0 (relu'd): they pass no gradient
    acts = torch.zeros_like(pre).scatter_(-1, slots, pre.gather(-1, slots)).to(dtype)
    return acts, subset, x, w_enc, b_enc, w_dec


@pytest.mark.parametrize("raise_only", [False, True], ids=["exact", "raise-only"])
@pytest.mark.parametrize("dtype", [torch.float64, F32, BF16], ids=["fp64", "fp32", "bf16"])
def test_subset_decode_matches_autograd_reference(dtype, raise_only):
    from sae_torch.kernels.row_subset import subset_decode, subset_decode_reference

    acts, subset, *params = _subset_inputs(dtype)
    assert (acts == 0).any() and (acts > 0).sum() < acts.numel()
    results = []
    for fn in (subset_decode, subset_decode_reference):
        leaves = [p.clone().requires_grad_() for p in params]
        out = fn(acts, subset, *leaves, raise_only=raise_only)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [p.grad for p in leaves])
    tol = {torch.float64: 1e-12, F32: 1e-5, BF16: 2e-2}[dtype]
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        scale = want.double().abs().max()
        assert scale > 0 and (got.double() - want.double()).abs().max() <= tol * scale
    d_w_enc, d_b_enc, d_w_dec = results[0][2:]
    outside = torch.ones(len(d_w_enc), dtype=torch.bool)
    outside[subset] = False
    assert d_w_enc[outside].abs().max() == 0 and d_b_enc[outside].abs().max() == 0
    assert d_w_dec[outside].abs().max() == 0
    assert ((d_b_enc <= 0).all() and (d_b_enc < 0).any()) if raise_only else (d_b_enc > 0).any()


def test_subset_decode_gradcheck_float64():
    from sae_torch.kernels.row_subset import subset_decode

    acts, subset, x, w_enc, b_enc, w_dec = _subset_inputs(torch.float64, n=6, d_in=5, d_out=4, m=12, rows=5,
                                                          per_token=2)
    # acts must stay relu(x w_enc[subset]^T + b_enc[subset]) at its nonzero slots while gradcheck perturbs the
    # inputs, so the function under test recomputes them from its inputs exactly as the coder would gather them
    mask = acts > 0

    def fn(x, w_enc, b_enc, w_dec):
        values = (x @ w_enc[subset].T + b_enc[subset]).detach()
        return subset_decode(torch.where(mask, values, 0), subset, x, w_enc, b_enc, w_dec)

    inputs = [t.clone().requires_grad_() for t in (x, w_enc, b_enc, w_dec)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_subset_decode_rejects_mismatched_shapes():
    from sae_torch.kernels.row_subset import subset_decode

    acts, subset, x, w_enc, b_enc, w_dec = _subset_inputs(F32)
    with pytest.raises(ValueError, match=r"acts must be \[N, len\(rows\)\]"):
        subset_decode(acts[:, :-1], subset, x, w_enc, b_enc, w_dec)
    with pytest.raises(ValueError, match="must share M"):
        subset_decode(acts, subset, x, w_enc, b_enc, w_dec[:-1])
