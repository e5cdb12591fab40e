"""`python -m bench`: training-step and kernel benchmarks of our torch (and MLX) backend against EleutherAI's sparsify.

Every measurement runs in a worker process (`bench.worker`) started from here: the timing worker holds all torch
sides of one config and interleaves their steps (same data, same device, same moment: background load hits all
sides alike); the memory workers run one side each in a fresh process. Results: `results.json` and `results.md`
in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    SIDES,
    VARIANT_KEYS,
    BenchConfig,
    describe_environment,
    dump,
    mlx_available,
    parse_variant,
    sparsify_available,
)

REPO = Path(__file__).resolve().parent.parent
TARGET = {"d_in": 768, "k": 32, "speed_ratio_min": 1.5, "memory_ratio_max": 0.7}

OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark a TopK SAE training step (forward + backward + optimizer step, AuxK on with a dead "
                    "mask) of sae_torch against eai-sparsify on the same configs, data and device; kernel "
                    "micro-benchmarks; the MLX backend on the same configs. Writes results.json and results.md.")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, mps or auto (cuda when available, else mps on Apple silicon, else cpu) [auto]")
    p.add_argument("--d-in", type=_ints, default=None,
                   help="comma-separated d_in values [cpu: 576,768; cuda: 576,768,2048]")
    p.add_argument("--k", type=_ints, default=None, help="comma-separated k values [cuda: 32,128; cpu: 32]")
    p.add_argument("--expansion", type=int, default=32, help="M = expansion * d_in [32]")
    p.add_argument("--tokens", type=_ints, default=[4096], help="comma-separated tokens per step [4096]")
    p.add_argument("--dead-frac", type=_floats, default=[0.05],
                   help="comma-separated fractions of latents marked dead, so AuxK runs with k_aux = "
                        "min(d_in/2, #dead); 0 turns AuxK off [0.05]")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per side [cpu 1, cuda 3]")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side; the median is reported "
                                                          "[cpu 5, cuda 20]")
    p.add_argument("--sides", default=",".join(SIDES),
                   help=f"torch sides to run, comma-separated, from {','.join(SIDES)} [{','.join(SIDES)}]; "
                        "sparsify is skipped with a note when it is not importable")
    p.add_argument("--variants", default="",
                   help="extra 'ours' sides with other settings, ';'-separated, each 'key=value[,key=value]' "
                        f"with keys {', '.join(VARIANT_KEYS)} (e.g. 'topk=triton;scatter=dot;aux_ratio=32'); each "
                        "runs interleaved with the others as side 'ours[SPEC]' []")
    p.add_argument("--no-mlx", action="store_true", help="skip the MLX backend")
    p.add_argument("--mlx-blas", default="auto",
                   help="OpenBLAS library to LD_PRELOAD into the MLX worker on Linux ('auto': Debian's "
                        "libopenblas0-pthread when present; 'none': MLX's bundled single-threaded BLAS, whose "
                        "4096x768x24576 matmul takes about a minute, so MLX is then run only with --quick shapes)")
    p.add_argument("--mlx-on", choices=["all", "first", "none"], default=None,
                   help="grid configs the MLX backend runs on [all with Metal; on Linux 'first' (the smallest): "
                        "there MLX runs its pure-MLX reference kernels on the CPU, about 100 s per step at d_in=768]")
    p.add_argument("--mlx-variants", default="default",
                   help="comma-separated kernel variants the MLX step is timed with, each 'default' or settings "
                        "joined by '+': topk=argpartition|metal, gws=scalar|wide, gather_dot=lanes|blocked, "
                        "scatter=serial|segmented|wide (the SAE_MLX_* variables of sae_mlx/kernels); e.g. "
                        "default,topk=metal,scatter=segmented,topk=metal+gws=wide+gather_dot=blocked+scatter=wide "
                        "on a Mac [default]")
    p.add_argument("--mlx-reps", type=int, default=None,
                   help="timed MLX steps [as --reps with Metal; on Linux 1, after no warm-up]")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the workers [PASSIVE: OpenMP's default spin-waiting makes each small "
                        "parallel op (a 131k-element sort: 5 ms -> 280 ms) crawl when the cores are shared with "
                        "other processes; '' leaves the environment as it is]")
    p.add_argument("--thp", action="store_true",
                   help="run the workers with THP_MEM_ALLOC_ENABLE=1 (torch backs allocations of 2 MB and more with "
                        "transparent huge pages: far fewer page faults for fresh large tensors; every side gets it, "
                        "as `sae train` sets it for itself on Linux) [off: the default environment]")
    p.add_argument("--profile", action="store_true",
                   help="also profile each side's training step on every grid config (torch.profiler; CUDA: per GPU "
                        "kernel, self device time, GPU busy time and launches per step; CPU: per aten op, self CPU "
                        "time) and print the per-kernel tables; written to profile.txt and results.json")
    p.add_argument("--profile-only", action="store_true",
                   help="only the profile (implies --profile, --no-memory, --no-kernels, no timing, no MLX)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps per side [cuda 5, cpu 1]")
    p.add_argument("--profile-rows", type=int, default=25, help="rows of each per-kernel table [25]")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    p.add_argument("--no-auxk-off", action="store_true", help="skip the AuxK-off peak-memory comparison")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel micro-benchmarks")
    p.add_argument("--kernel-config", type=_ints, default=None,
                   help="d_in,k of the kernel micro-benchmark [768,32; with --quick the quick config]")
    p.add_argument("--candidates", action="store_true",
                   help="CPU only: also time the alternative kernels of bench/candidates.py against sae_torch's "
                        "gather_dot / scatter_outer (off by default: at d_in=768 on 2 cores it added ~35 s near idle, "
                        "minutes under load: the old gather + bmm and sparsify's index_add_ way take seconds per call "
                        "on the AuxK set)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers [torch's default]")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker before it is abandoned [900]")
    p.add_argument("--quick", action="store_true",
                   help="a tiny config (d_in=64, M=2048, k=8, 256 tokens, 1 warm-up, 2 timed steps): checks that "
                        "everything runs, in seconds; its numbers mean nothing")
    p.add_argument("--out", default=None, help="output folder [bench/results/<device>, or .../quick]")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None,
                   help="only rewrite results.md beside RESULTS_JSON from it (no measurement)")
    return p.parse_args(argv)


def resolve_device(arg: str) -> str:
    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if arg == "mps" and not mps:
        raise SystemExit("--device mps: torch sees no Metal (MPS) device (Apple silicon with macOS 12.3+ and an "
                         "arm64 Python)")
    return arg


# --mlx-variants keys -> the environment variables sae_mlx reads (sae_mlx/kernels/topk.py, sparse_rows.py)
MLX_VARIANT_ENV = {"topk": ("SAE_MLX_TOPK", ("argpartition", "metal")),
                   "gws": ("SAE_MLX_GWS", ("scalar", "wide")),
                   "gather_dot": ("SAE_MLX_GATHER_DOT", ("lanes", "blocked")),
                   "scatter": ("SAE_MLX_SCATTER", ("serial", "segmented", "wide"))}


def parse_mlx_variants(text: str) -> dict[str, dict[str, str]]:
    """{variant name: environment} from --mlx-variants; 'default' sets every variable to its default."""
    variants = {}
    for name in (v.strip() for v in text.split(",")):
        if not name:
            continue
        env = {var: choices[0] for var, choices in MLX_VARIANT_ENV.values()}
        if name != "default":
            for setting in name.split("+"):
                key, _, value = setting.partition("=")
                if key not in MLX_VARIANT_ENV or value not in MLX_VARIANT_ENV[key][1]:
                    choices = "; ".join(f"{k}={'|'.join(c)}" for k, (_, c) in MLX_VARIANT_ENV.items())
                    raise SystemExit(f"--mlx-variants: unknown setting {setting!r}; choose from {choices}")
                env[MLX_VARIANT_ENV[key][0]] = value
        variants[name] = env
    if not variants:
        raise SystemExit("--mlx-variants: give at least one variant (e.g. default)")
    return variants


def find_openblas(arg: str) -> str | None:
    if arg == "none" or sys.platform != "linux":
        return None
    if arg != "auto":
        return arg
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


WORKER_ENV: dict = {}


def run_worker(mode: str, args: dict, timeout: int, env_extra: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, **WORKER_ENV, **(env_extra or {})}
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.worker", mode, json.dumps(args), str(result)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"worker '{mode}' exceeded --timeout={timeout}s"}
        if not result.exists():
            return {"ok": False, "error": f"worker '{mode}' exited {proc.returncode} without a result",
                    "stderr_tail": proc.stderr[-3000:]}
        out = json.loads(result.read_text())
        out["process_wall_s"] = time.perf_counter() - t0
        if not out.get("ok"):
            out["stderr_tail"] = proc.stderr[-3000:]
        return out


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render:
        path = Path(a.render)
        print(_write(json.loads(path.read_text()), path.parent))
        return 0
    device = resolve_device(a.device)
    cuda = device.startswith("cuda")
    if a.profile_only:
        a.profile = a.no_memory = a.no_kernels = a.no_mlx = True
    if a.quick:
        grid = [BenchConfig(d_in=64, k=8, n_tokens=256, expansion=a.expansion, dead_frac=f) for f in a.dead_frac]
        warmup, reps = 1 if a.warmup is None else a.warmup, 2 if a.reps is None else a.reps
    else:
        d_ins = a.d_in or ([576, 768, 2048] if cuda else [576, 768])
        ks = a.k or ([32, 128] if cuda else [32])
        grid = [BenchConfig(d_in=d, k=k, n_tokens=n, expansion=a.expansion, dead_frac=f)
                for d in d_ins for k in ks for n in a.tokens for f in a.dead_frac]
        warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
        # CPU 5: the default grid then takes about 4-5 minutes on an idle 2-core machine (bench/README.md)
        reps = a.reps if a.reps is not None else (20 if cuda else 5)
    out_dir = Path(a.out) if a.out else REPO / "bench" / "results" / ("quick" if a.quick else device.split(":")[0])
    out_dir.mkdir(parents=True, exist_ok=True)

    sides = [s for s in a.sides.split(",") if s]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {SIDES}")
    for spec in (v.strip() for v in a.variants.split(";")):
        if spec:
            try:
                parse_variant(spec)
            except ValueError as exc:
                raise SystemExit(f"--variants: {exc}") from None
            sides.append(f"ours[{spec}]")
    notes = []
    sp_ok, sp_reason = sparsify_available()
    if "sparsify" in sides and not sp_ok:
        sides.remove("sparsify")
        notes.append(f"sparsify side skipped: {sp_reason}")
    common = {"device": device, "threads": a.threads}
    if a.omp_wait_policy:
        WORKER_ENV["OMP_WAIT_POLICY"] = a.omp_wait_policy
    if a.thp:
        WORKER_ENV["THP_MEM_ALLOC_ENABLE"] = "1"

    results = {"environment": describe_environment(device), "settings": {
        "warmup": warmup, "reps": reps, "sides": sides, "quick": a.quick, "argv": sys.argv[1:] if argv is None
        else list(argv), "worker_env": dict(WORKER_ENV)}, "notes": notes, "configs": [], "kernels": None,
        "memory_auxk_off": []}
    if device == "mps":
        notes.append("Apple silicon: the torch sides (ours and sparsify) run on MPS in fp32 (no autocast), as the "
                     "MLX side does on Metal; peak memory is not measured on MPS (unified memory: torch.mps has no "
                     "peak counter), so the memory workers are skipped.")
    elif not cuda:
        notes.append("GPU numbers are not measured yet: this run is on CPU. On a CUDA machine the same command "
                     "runs the full grid with Triton kernels, bf16 autocast, CUDA-event timing and "
                     "torch.cuda.max_memory_allocated.")
    t_start = time.perf_counter()

    mlx_run, mlx_env = False, {}
    metal = sys.platform == "darwin"
    mlx_on = a.mlx_on or ("all" if metal or a.quick else "first")
    mlx_warmup, mlx_reps = (warmup, reps) if metal or a.quick else (0, 1)
    if a.mlx_reps is not None:
        mlx_reps = a.mlx_reps
    if not a.no_mlx and mlx_on != "none":
        ok, why = mlx_available()
        blas = find_openblas(a.mlx_blas)
        if not ok:
            notes.append(f"MLX skipped: {why}")
        elif sys.platform == "linux" and blas is None and not a.quick:
            notes.append("MLX skipped on these shapes: no OpenBLAS to LD_PRELOAD (MLX's bundled BLAS on Linux is "
                         "single-threaded reference code, about a minute per encoder GEMM); install Debian's "
                         "libopenblas0-pthread or pass --mlx-blas PATH")
        else:
            mlx_run = True
            if blas:
                mlx_env = {"LD_PRELOAD": blas}

    no_memory = a.no_memory or device == "mps"
    mlx_variants = parse_mlx_variants(a.mlx_variants)
    profile_steps = a.profile_steps if a.profile_steps is not None else (5 if cuda else 1)
    for cfg in grid:
        entry = {"config": cfg.to_dict()}
        if not a.profile_only:
            log(f"{cfg.name}: timing {', '.join(sides)} (interleaved, {warmup} warm-up + {reps} timed steps each)")
            entry["time"] = run_worker("time", {**common, "config": cfg.to_dict(), "sides": sides, "warmup": warmup,
                                                "reps": reps}, a.timeout)
        if a.profile:
            log(f"{cfg.name}: profiling {', '.join(sides)} (1 warm-up + {profile_steps} profiled steps each)")
            entry["profile"] = run_worker("profile", {**common, "config": cfg.to_dict(), "sides": sides,
                                                      "steps": profile_steps, "rows": a.profile_rows}, a.timeout)
            text = profile_text(results["configs"] + [entry])
            (out_dir / "profile.txt").write_text(text)
        if not no_memory:
            entry["memory"] = {}
            for s in sides:
                log(f"{cfg.name}: peak memory of {s} (fresh process)")
                entry["memory"][s] = run_worker("memory", {**common, "config": cfg.to_dict(), "side": s}, a.timeout)
        if mlx_run and (mlx_on == "all" or cfg is grid[0]):
            for i, (variant, variant_env) in enumerate(mlx_variants.items()):
                # entry["mlx"]: the first variant; the others beside it, by name
                log(f"{cfg.name}: MLX backend, kernels {variant} ({mlx_warmup} warm-up + {mlx_reps} timed steps)")
                result = run_worker("mlx", {"config": cfg.to_dict(), "warmup": mlx_warmup, "reps": mlx_reps},
                                    a.timeout, {**mlx_env, **variant_env})
                if i == 0:
                    entry["mlx"] = result
                else:
                    entry.setdefault("mlx_variants", {})[variant] = result
        results["configs"].append(entry)
        _write(results, out_dir)

    # AuxK off vs on, peak memory (one config): shows what the step keeps alive with and without AuxK
    if not no_memory and not a.no_auxk_off:
        base = _pick_target(grid)
        off = BenchConfig(d_in=base.d_in, k=base.k, n_tokens=base.n_tokens, expansion=base.expansion, dead_frac=0.0)
        for s in sides:
            log(f"{off.name}: peak memory of {s} with AuxK off")
            results["memory_auxk_off"].append(
                {"config": off.to_dict(), "side": s,
                 "memory": run_worker("memory", {**common, "config": off.to_dict(), "side": s}, a.timeout)})
        _write(results, out_dir)

    if not a.no_kernels:
        kc = _pick_target(grid)
        if a.kernel_config:
            kc = BenchConfig(d_in=a.kernel_config[0], k=a.kernel_config[1], n_tokens=a.tokens[0],
                             expansion=a.expansion, dead_frac=a.dead_frac[0])
        log(f"{kc.name}: kernel micro-benchmarks")
        results["kernels"] = {"config": kc.to_dict(), **run_worker(
            "kernels", {**common, "config": kc.to_dict(), "reps": max(3, reps) if cuda else min(3, reps),
                        "sparsify": "sparsify" in sides, "candidates": a.candidates}, a.timeout)}
    results["total_wall_s"] = time.perf_counter() - t_start
    results["environment"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    md = _write(results, out_dir)
    print(md)
    if a.profile:
        print(profile_text(results["configs"]))
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'} in {results['total_wall_s']:.0f} s")
    failed = _failures(results)
    for f in failed:
        log(f"FAILED: {f}")
    return 1 if failed else 0


def _pick_target(grid: list[BenchConfig]) -> BenchConfig:
    """The target config (d_in 768, k 32), preferring 4096 tokens and the most common dead fraction (0.05)."""
    matches = [c for c in grid if c.d_in == TARGET["d_in"] and c.k == TARGET["k"]] or grid
    return min(matches, key=lambda c: (c.n_tokens != 4096, c.dead_frac != 0.05))


def profile_text(entries: list[dict]) -> str:
    """The per-kernel tables of every profiled config and side, as text."""
    lines = []
    for e in entries:
        prof = e.get("profile")
        if prof is None:
            continue
        lines.append(f"===== {e['config']['name']} =====")
        if not prof.get("ok"):
            lines.append(f"profile failed: {prof.get('error')}")
            continue
        for side, v in prof["sides"].items():
            head = f"--- {side}: {v['wall_s_per_step'] * 1e3:.3f} ms/step wall over {prof['steps']} profiled step(s)"
            if "busy_s_per_step" in v:
                head += (f"; GPU busy {v['busy_s_per_step'] * 1e3:.3f} ms/step "
                         f"({100 * v['busy_s_per_step'] / v['wall_s_per_step']:.0f}%), "
                         f"{v['kernel_launches_per_step']:.0f} kernel launches/step")
            lines += [head, f"(sorted by {prof['sorted_by']}; totals over all profiled steps)", v["table"]]
    return "\n".join(lines) + "\n"


def _failures(results: dict) -> list[str]:
    bad = []
    for e in results["configs"]:
        name = e["config"]["name"]
        if "time" in e and not e["time"].get("ok"):
            bad.append(f"{name} time: {e['time'].get('error')}")
        if "profile" in e and not e["profile"].get("ok"):
            bad.append(f"{name} profile: {e['profile'].get('error')}")
        for s, m in (e.get("memory") or {}).items():
            if not m.get("ok"):
                bad.append(f"{name} memory {s}: {m.get('error')}")
        if e.get("mlx") is not None and not e["mlx"].get("ok"):
            bad.append(f"{name} mlx: {e['mlx'].get('error')}")
        for variant, result in (e.get("mlx_variants") or {}).items():
            if not result.get("ok"):
                bad.append(f"{name} mlx ({variant}): {result.get('error')}")
    for m in results["memory_auxk_off"]:
        if not m["memory"].get("ok"):
            bad.append(f"{m['config']['name']} memory {m['side']}: {m['memory'].get('error')}")
    k = results.get("kernels")
    if k is not None and not k.get("ok"):
        bad.append(f"kernels: {k.get('error')}")
    return bad


def _write(results: dict, out_dir: Path) -> str:
    from bench.report import markdown

    (out_dir / "results.json").write_text(dump(results) + "\n")
    md = markdown(results, TARGET)
    (out_dir / "results.md").write_text(md)
    return md
