"""`python -m parity` (also `sae parity`): run every computation path available here against the float64 oracle
and against each other, print a table, exit non-zero on any failure."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .suite import Row, available_paths, run_suite, summarize

PATH_ORDER = ("torch-eager", "torch-triton", "mlx-fallback", "mlx-metal", "mlx-compiled", "metal-harness")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paths", default="available",
                        help=f"comma-separated paths to check, from {', '.join(PATH_ORDER)} (default: all available)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--quick", action="store_true", help="every config variant once instead of x4 dead masks")
    parser.add_argument("--seed", type=int, default=0, help="fixture seed")
    parser.add_argument("--json", action="store_true", help="print JSON (every row, the summary, paths) instead")
    parser.add_argument("--all-rows", action="store_true", help="print every (case, quantity) row, not the worst")
    parser.add_argument("--training", action="store_true",
                        help="also train 300 steps on torch and MLX from the same init and compare (parity.training: "
                             "Adam and signum, fp32, about a minute)")
    parser.add_argument("--no-step", action="store_true",
                        help="skip the training-step check (parity.step: a few optimizer steps of each trainer, MLX "
                             "eager and compiled, against a float64 reference step; on by default, a few seconds)")
    parser.add_argument("--report", metavar="FILE",
                        help="also write everything to FILE: machine, OS, CPU/GPU, Python and package versions, every "
                             "row, the kernels each path ran (JSON; Markdown with the JSON inside if FILE ends in .md)")


def _child_rows(path: str, args) -> list[Row]:
    """Run one path in a child process (the Triton interpreter must be switched on before triton loads)."""
    cmd = [sys.executable, "-m", "parity", "--paths", path, "--dtypes", args.dtypes, "--seed", str(args.seed),
           "--json", "--no-step"] + (["--quick"] if args.quick else [])
    env = dict(os.environ, TRITON_INTERPRET="1", SAE_TRITON_CPU="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"the {path} child process failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    return [Row(**row) for row in report["rows"]], report.get("kernels", {}).get(path, [])


def run(args) -> int:
    reasons = available_paths()
    if args.paths == "available":
        paths = [p for p in PATH_ORDER if reasons[p] is None]
    else:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = [p for p in paths if p not in reasons]
        if unknown:
            print(f"error: unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATH_ORDER)}",
                  file=sys.stderr)
            return 2
        missing = [f"{p} ({reasons[p]})" for p in paths if reasons[p] is not None]
        if missing:
            print(f"error: not available here: {'; '.join(missing)}", file=sys.stderr)
            return 2
    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    if args.report and (Path(args.report).is_dir() or not Path(args.report).resolve().parent.is_dir()):
        print(f"error: --report {args.report}: not a file in an existing folder", file=sys.stderr)
        return 2
    triton_in_child = ("torch-triton" in paths and not _on_gpu()
                       and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
    in_process = [p for p in paths if not (p == "torch-triton" and triton_in_child)]
    progress = None
    if not args.json and sys.stderr.isatty():  # a one-line live status; nothing when logged to a file
        progress = lambda p, c, d: print(f"\r{p:17s} {d:9s} {c:45s}", end="", file=sys.stderr, flush=True)
    started = time.perf_counter()
    kernels: dict[str, list[str]] = {}
    rows = run_suite(in_process, dtypes, args.quick, args.seed, progress=progress, kernels=kernels)
    if triton_in_child:
        try:
            child_rows, kernels["torch-triton"] = _child_rows("torch-triton", args)
            rows += child_rows
        except RuntimeError as error:  # reported as a failed path; the other paths' rows still print
            rows.append(Row("torch-triton", str(error).splitlines()[0], "all", "path failed", 1.0, 0.0, False))
    if not args.no_step:
        rows += _step_rows(paths, progress)
    if args.training:
        rows += _training_rows(reasons)
    if progress:
        print("\r" + " " * 72 + "\r", end="", file=sys.stderr)
    ok = all(row.ok for row in rows)
    summary = summarize(rows)
    result = {"ok": ok, "paths": {p: reasons[p] for p in PATH_ORDER}, "checked": paths,
              "kernels": {p: kernels[p] for p in paths if p in kernels}, "summary": summary,
              "rows": [asdict(r) for r in rows]}
    if args.json:
        print(json.dumps(result))
    else:
        print_table([asdict(r) for r in rows] if args.all_rows else summary, reasons, paths)
        print_kernels(result["kernels"])
        print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r.ok for r in rows)} of {len(rows)} checks within their ceilings "
              f"({len(rows) and len({r.case for r in rows})} cases, paths: {', '.join(paths)})")
    if args.report:
        from .report import write_report

        result["seconds"] = round(time.perf_counter() - started, 1)
        result["command"] = ["python", "-m", "parity", *getattr(args, "argv", sys.argv[1:])]
        written = write_report(args.report, result)
        print(f"report written to {written}", file=sys.stderr)
    return 0 if ok else 1


def _step_rows(paths: list[str], progress=None) -> list[Row]:
    """parity.step for the backends of the checked paths: torch (torch-eager / torch-triton), MLX eager and
    compiled (mlx-fallback / mlx-metal / metal-harness). A backend whose run raises gives one failed row with the
    reason, and the others still run."""
    from .step import REFERENCE_OPTIMIZERS, run_step_parity

    backends = (["torch"] if any(p.startswith("torch") for p in paths) else []) + \
        (["mlx", "mlx-compiled"] if any(p.startswith(("mlx", "metal")) for p in paths) else [])
    rows = []
    for backend in backends:
        for optimizer in REFERENCE_OPTIMIZERS:
            if progress:
                progress(f"step:{backend}", optimizer, "float32")
            try:
                rows += run_step_parity([backend], [optimizer])
            except Exception as error:  # reported as a failed row: the other checks still run
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                rows.append(Row(f"step:{backend}", f"{optimizer}: raised {reason}", "float32", "step: ran",
                                float("inf"), 0.0, False))
    return rows


def _training_rows(reasons: dict) -> list[Row]:
    if reasons["torch-eager"] or reasons["mlx-fallback"]:
        print("skipped training parity: it needs both torch and mlx", file=sys.stderr)
        return []
    from .training import run_training_parity

    return [row for optimizer in ("adam", "signum") for row in run_training_parity(optimizer=optimizer)]


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def print_kernels(kernels: dict[str, list[str]]) -> None:
    """Which kernel implementations each path ran, so a pass says what it covered."""
    if kernels:
        print("\nkernels run per path:")
    for path, names in kernels.items():
        print(f"  {path:14s} {', '.join(names) if names else '(none)'}")


def print_table(rows: list[dict], reasons: dict, paths: list[str]) -> None:
    for path in PATH_ORDER:
        if path not in paths:
            print(f"skipped {path}: {reasons[path] or 'not asked for'}")
    header = f"{'path':17s} {'dtype':9s} {'quantity':40s} {'max error':>10s} {'ceiling':>10s}  result  worst case"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['path']:17s} {row['dtype']:9s} {row['quantity'][:40]:40s} {row['error']:10.3g} "
              f"{row['ceiling']:10.3g}  {'pass' if row['ok'] else 'FAIL':6s}  {row['case']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the report (`sae parity` passes its own)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
