"""`python -m parity` (also `sae parity`): run every computation path available here against the float64 oracle
and against each other, print a table, exit non-zero on any failure."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict

from .suite import Row, available_paths, run_suite, summarize

PATH_ORDER = ("torch-eager", "torch-triton", "mlx-fallback", "mlx-metal", "metal-harness")


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


def _child_rows(path: str, args) -> list[Row]:
    """Run one path in a child process (the Triton interpreter must be switched on before triton loads)."""
    cmd = [sys.executable, "-m", "parity", "--paths", path, "--dtypes", args.dtypes, "--seed", str(args.seed),
           "--json"] + (["--quick"] if args.quick else [])
    env = dict(os.environ, TRITON_INTERPRET="1", SAE_TRITON_CPU="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"the {path} child process failed:\n{done.stderr[-3000:]}")
    return [Row(**row) for row in json.loads(done.stdout)["rows"]]


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
    triton_in_child = ("torch-triton" in paths and not _on_gpu()
                       and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
    in_process = [p for p in paths if not (p == "torch-triton" and triton_in_child)]
    progress = None
    if not args.json and sys.stderr.isatty():  # a one-line live status; nothing when logged to a file
        progress = lambda p, c, d: print(f"\r{p:14s} {d:9s} {c:45s}", end="", file=sys.stderr, flush=True)
    rows = run_suite(in_process, dtypes, args.quick, args.seed, progress=progress)
    if triton_in_child:
        try:
            rows += _child_rows("torch-triton", args)
        except RuntimeError as error:  # reported as a failed path; the other paths' rows still print
            rows.append(Row("torch-triton", str(error).splitlines()[0], "all", "path failed", 1.0, 0.0, False))
    if args.training:
        rows += _training_rows(reasons)
    if progress:
        print("\r" + " " * 72 + "\r", end="", file=sys.stderr)
    ok = all(row.ok for row in rows)
    summary = summarize(rows)
    if args.json:
        print(json.dumps({"ok": ok, "paths": {p: reasons[p] for p in PATH_ORDER}, "summary": summary,
                          "rows": [asdict(r) for r in rows]}))
    else:
        print_table([asdict(r) for r in rows] if args.all_rows else summary, reasons, paths)
        print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r.ok for r in rows)} of {len(rows)} checks within their ceilings "
              f"({len(rows) and len({r.case for r in rows})} cases, paths: {', '.join(paths)})")
    return 0 if ok else 1


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


def print_table(rows: list[dict], reasons: dict, paths: list[str]) -> None:
    for path in PATH_ORDER:
        if path not in paths:
            print(f"skipped {path}: {reasons[path] or 'not asked for'}")
    header = f"{'path':14s} {'dtype':9s} {'quantity':40s} {'max error':>10s} {'ceiling':>10s}  result  worst case"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['path']:14s} {row['dtype']:9s} {row['quantity'][:40]:40s} {row['error']:10.3g} "
              f"{row['ceiling']:10.3g}  {'pass' if row['ok'] else 'FAIL':6s}  {row['case']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
