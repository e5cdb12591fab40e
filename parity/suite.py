"""The parity suite: every computation path available here, checked against the float64 oracle (docs/SPEC.md section 4)
and against each other on the same checkpoint files.

Paths: torch-eager, torch-triton (compiled on CUDA, the Triton interpreter on CPU), mlx-fallback, mlx-metal
(Apple silicon), mlx-compiled (the forward and backward under mx.compile, as the trainer's SAE_MLX_COMPILE=all
runs them: Metal kernels on Apple silicon, else the MLX references), and metal-harness (our Metal kernel source
compiled with g++ on Linux, run over its launch grid).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .compare import TOLERANCES, Check, compare_with_oracle, relative_max_error, relative_scalar_error
from .fixtures import Case, all_cases
from .oracle import evaluate
from .runners import LOSS_AUXK_ALPHA


@dataclass
class Row:
    path: str
    case: str
    dtype: str
    quantity: str
    error: float
    ceiling: float
    ok: bool


@contextlib.contextmanager
def environment(**values):
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _metal() -> bool:
    if not _has("mlx"):
        return False
    import mlx.core as mx

    return mx.metal.is_available()


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_paths() -> dict[str, str | None]:
    """Path name -> None when it runs here, else the reason it does not."""
    reasons = {}
    reasons["torch-eager"] = None if _has("torch") else "torch is not installed"
    if not (_has("torch") and _has("triton")):
        reasons["torch-triton"] = "torch and triton are not both installed"
    else:
        reasons["torch-triton"] = None  # on CPU it runs in a child process under TRITON_INTERPRET=1
    reasons["mlx-fallback"] = None if _has("mlx") else "mlx is not installed"
    reasons["mlx-metal"] = None if _metal() else "needs Apple-silicon Metal (mx.metal.is_available() is False)"
    reasons["mlx-compiled"] = None if _has("mlx") else "mlx is not installed"
    if not _has("mlx"):
        reasons["metal-harness"] = "mlx is not installed"
    elif not _has("parity.metal_harness"):
        reasons["metal-harness"] = "parity.metal_harness is missing"
    else:
        from .metal_harness import compiler_missing

        reasons["metal-harness"] = compiler_missing()
    return reasons


KERNEL_SUFFIXES = ("_reference", "_triton", "_metal")  # the implementations behind each backend's dispatchers


def _kernel_modules(path: str) -> list:
    """The modules whose kernel functions a path may run: the backend's kernel modules and its sparse coder (which
    imports `subset_decode`, the dense-subset AuxK, into its own namespace)."""
    import importlib

    backend = "sae_torch" if path.startswith("torch") else "sae_mlx"
    return [importlib.import_module(f"{backend}.{name}")
            for name in ("kernels.sparse_rows", "kernels.row_subset", "sparse_coder")]


@contextlib.contextmanager
def recording_kernels(path: str):
    """Within this context every kernel implementation the path calls (a module-level function of its kernel
    modules named *_reference, *_triton or *_metal, and `subset_decode`) is recorded by name, in order of first
    use; yields that list. The dispatchers look these functions up as module globals, so wrapping them there
    sees every call, also from autograd functions, custom vjps and `mx.compile` tracing."""
    ran: list[str] = []
    patched = []
    for module in _kernel_modules(path):
        for name, fn in list(vars(module).items()):
            if not (inspect.isfunction(fn) and (name.endswith(KERNEL_SUFFIXES) or name == "subset_decode")):
                continue
            if name.startswith(("_", "plan_", "use_")):  # helpers and the dispatch predicates
                continue

            def spy(*args, _fn=fn, _name=name, **kwargs):
                if _name not in ran:
                    ran.append(_name)
                return _fn(*args, **kwargs)

            setattr(module, name, spy)
            patched.append((module, name, fn))
    try:
        yield ran
    finally:
        for module, name, fn in reversed(patched):
            setattr(module, name, fn)


def run_path(path: str, case: Case, dtype: str, checkpoint: Path, coder_cls=None):
    """Run one case on one path: (outputs, selection, params), the runner contract of parity.runners."""
    from . import runners

    if path == "torch-eager":
        with environment(SAE_EAGER="1"):
            return runners.run_torch(case, dtype, checkpoint=checkpoint, coder_cls=coder_cls)
    if path == "torch-triton":
        device = "cuda" if _cuda() else "cpu"  # on CPU only under TRITON_INTERPRET=1 (see __main__)
        with environment(SAE_EAGER="0", SAE_TRITON_CPU="1"):
            return runners.run_torch(case, dtype, device=device, checkpoint=checkpoint, coder_cls=coder_cls)
    if path == "mlx-fallback":
        with environment(SAE_EAGER="1"):
            return runners.run_mlx(case, dtype, checkpoint=checkpoint)
    if path == "mlx-metal":
        with environment(SAE_EAGER="0"):
            return runners.run_mlx(case, dtype, checkpoint=checkpoint)
    if path == "mlx-compiled":  # the kernels Metal would run where it can, else the MLX references
        with environment(SAE_EAGER="0" if _metal() else "1"):
            return runners.run_mlx(case, dtype, checkpoint=checkpoint, compiled=True)
    if path == "metal-harness":
        from .metal_harness import kernels_through_harness

        with environment(SAE_EAGER="1"), kernels_through_harness():
            return runners.run_mlx(case, dtype, checkpoint=checkpoint)
    raise ValueError(f"unknown path {path!r}")


def check_case(path: str, case: Case, dtype: str, folder: Path, coder_cls=None) -> tuple[list[Row], dict]:
    """One case on one path, loaded from its checkpoint file `folder`. The oracle evaluates the parameters the
    fixture made (rounded to `dtype`), not what the path read back: a writer or reader that swaps two
    equal-shaped tensors fails here, and the parameters the path held are compared with them bit for bit."""
    outputs, selection, params = run_path(path, case, dtype, folder, coder_cls)
    seen = case.rounded_to(dtype)
    kwargs = dict(case.oracle_kwargs(), auxk_alpha=LOSS_AUXK_ALPHA)
    ref = evaluate(seen.params, seen.x, seen.y, selection=selection, **kwargs)
    own = evaluate(seen.params, seen.x, seen.y, **kwargs)
    loaded = Check("parameters as loaded (vs the fixture's)",
                   max(relative_max_error(params.get(name), value) if name in params else float("inf")
                       for name, value in seen.params.items()), 0.0)
    checks = [loaded] + compare_with_oracle(outputs, ref, own, dtype=dtype, activation=case.cfg.activation,
                                            k=case.cfg.k, dead_mask=case.dead_mask)
    return [Row(path, case.name, dtype, c.quantity, c.error, c.ceiling, c.ok) for c in checks], outputs


def cross_check(path: str, reference_path: str, case: Case, outputs: dict, reference: dict) -> list[Row]:
    """Two paths on the same checkpoint file: the same latents, outputs and gradients (fp32)."""
    vec_tol, scalar_tol = TOLERANCES["float32"]
    same = np.array_equal(np.sort(outputs["latent_indices"], 1), np.sort(reference["latent_indices"], 1))
    checks = [Check(f"vs {reference_path}: latent indices", 0.0 if same else 1.0, 0.0),
              Check(f"vs {reference_path}: sae_out", relative_max_error(outputs["sae_out"], reference["sae_out"]),
                    vec_tol)]
    for name in ("fvu", "auxk_loss", "multi_topk_fvu"):
        checks.append(Check(f"vs {reference_path}: {name}", relative_scalar_error(outputs[name], reference[name]),
                            scalar_tol))
    for name, grad in reference["grads"].items():
        checks.append(Check(f"vs {reference_path}: grad {name}", relative_max_error(outputs["grads"][name], grad),
                            vec_tol))
    return [Row(path, case.name, "float32", c.quantity, c.error, c.ceiling, c.ok) for c in checks]


def select_cases(quick: bool, seed: int = 0) -> list[Case]:
    cases = all_cases(seed)
    if quick:  # every config variant once, the dead masks spread over them
        cases = [c for i, c in enumerate(cases) if i % 4 == (i // 4) % 4]
    return cases


def run_suite(paths: list[str], dtypes=("float32", "bfloat16"), quick=False, seed=0, coder_cls=None,
              progress=None, kernels: dict[str, list[str]] | None = None) -> list[Row]:
    """Every case on every path (and the paths against the first one): the rows. `kernels`, if given, is filled
    with {path: the kernel implementations that ran on it} (see `recording_kernels`)."""
    cases = select_cases(quick, seed)
    rows: list[Row] = []
    fp32_outputs: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="sae-parity-") as tmp:
        folders = {case.name: case.write(Path(tmp) / case.name) for case in cases}
        for path in paths:
            with recording_kernels(path) as ran:
                for dtype in dtypes:
                    for case in cases:
                        if progress:
                            progress(path, case.name, dtype)
                        try:
                            case_rows, outputs = check_case(path, case, dtype, folders[case.name], coder_cls)
                        except Exception as error:  # a path that cannot run is a failed row; the others still run
                            rows.append(failed_path_row(path, case, dtype, error))
                            break
                        rows += case_rows
                        if dtype == "float32":
                            fp32_outputs[path, case.name] = outputs
            if kernels is not None:
                kernels[path] = list(ran)
    reference = paths[0] if paths else None
    for path in paths[1:]:
        for case in cases:
            if (path, case.name) in fp32_outputs and (reference, case.name) in fp32_outputs:
                rows += cross_check(path, reference, case, fp32_outputs[path, case.name],
                                    fp32_outputs[reference, case.name])
    return rows


def failed_path_row(path: str, case: Case, dtype: str, error: BaseException) -> Row:
    """The row of a path that raised (e.g. the Metal harness's compiler refused the source): quantity "path
    failed", the case it failed on and the first line of the error, so the table says why."""
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    # error 1 over ceiling 0, as a failed exact check: finite, so --json and report files stay strict JSON
    return Row(path, f"{case.name}: {type(error).__name__}: {reason}", dtype, "path failed", 1.0, 0.0, False)


def summarize(rows: list[Row]) -> list[dict]:
    """Worst error per (path, dtype, quantity) over all cases, with the case it came from."""
    worst: dict[tuple, Row] = {}
    for row in rows:
        key = (row.path, row.dtype, row.quantity)
        current = worst.get(key)
        margin = row.error - row.ceiling
        if (current is None or (not row.ok and current.ok)
                or (row.ok == current.ok and margin > current.error - current.ceiling)):
            worst[key] = row
    return [asdict(row) | {"cases": sum(1 for r in rows if (r.path, r.dtype, r.quantity) == key)}
            for key, row in worst.items()]
