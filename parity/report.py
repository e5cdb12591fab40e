"""`python -m parity --report FILE`: one file that proves what ran where. It holds the machine (architecture, OS,
CPU and GPU names, memory), the Python and package versions, the relevant environment variables, the result, every
path checked or skipped (with the reason), the kernel implementations each path ran, and every row (failures
included). JSON, or Markdown with the same JSON at its end when FILE ends in .md, so a Mac user's run can be sent
back as it is. No host name, user name or path of the machine is recorded.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("sae-twins", "numpy", "safetensors", "ml_dtypes", "torch", "triton", "mlx", "mlx-metal", "mlx-lm",
            "transformers")
ENVIRONMENT = ("SAE_EAGER", "SAE_MLX_COMPILE", "SAE_TRITON_CPU", "TRITON_INTERPRET", "MLX_ENABLE_TF32", "CXX",
               "OMP_NUM_THREADS")


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def cpu_name() -> str | None:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"])
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> dict:
    """What each framework sees: CUDA devices and MPS (torch), Metal (MLX, with its device_info)."""
    out: dict = {}
    try:
        import torch

        out["torch_cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["torch_mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except Exception as error:  # torch missing or broken: say so, the report is still written
        out["torch"] = f"unavailable: {type(error).__name__}: {error}"
    try:
        import mlx.core as mx

        out["mlx_metal"] = bool(mx.metal.is_available())
        if out["mlx_metal"]:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            out["mlx_device_info"] = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                      for k, v in dict(info).items()}
    except Exception as error:
        out["mlx"] = f"unavailable: {type(error).__name__}: {error}"
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(),
                                  "python_implementation": platform.python_implementation()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["sae-twins git commit"] = _run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse",
                                        "HEAD"])
    return out


def machine() -> dict:
    return {"architecture": platform.machine(), "system": platform.system(), "release": platform.release(),
            "platform": platform.platform(), "macos": platform.mac_ver()[0] or None, "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "memory_bytes": memory_bytes(), "gpu": gpus()}


def build_report(result: dict) -> dict:
    """The parity result (as `python -m parity --json` prints it) with the machine, versions and environment."""
    return {"report": "sae-twins parity", "machine": machine(), "versions": versions(),
            "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}, **result}


def to_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = [f"# sae-twins parity: {'PASS' if report['ok'] else 'FAIL'}", "",
             f"`{' '.join(report.get('command', ['python', '-m', 'parity']))}`"
             + (f", {report['seconds']} s" if "seconds" in report else ""), "",
             "## Machine", "",
             f"- {m['system']} {m['release']} ({m['platform']}), {m['architecture']}"
             + (f", macOS {m['macos']}" if m["macos"] else ""),
             f"- CPU: {m['cpu']} ({m['cpu_count']} cores), memory "
             + (f"{m['memory_bytes'] / 2**30:.1f} GiB" if m["memory_bytes"] else "unknown"),
             f"- GPU: {json.dumps(m['gpu'])}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             "- environment: " + (", ".join(f"{k}={val}" for k, val in report["environment"].items()) or "(none set)"),
             "", "## Paths", ""]
    for path, reason in report["paths"].items():
        status = "checked" if path in report["checked"] else f"skipped: {reason or 'not asked for'}"
        kernels = report["kernels"].get(path)
        lines.append(f"- `{path}`: {status}" + (f"; kernels run: {', '.join(kernels) or '(none)'}"
                                                if kernels is not None else ""))
    failed = [r for r in report["rows"] if not r["ok"]]
    lines += ["", f"## Worst row per (path, dtype, quantity); {len(report['rows'])} rows, {len(failed)} failed", "",
              "| path | dtype | quantity | max error | ceiling | result | worst case |",
              "|---|---|---|---|---|---|---|"]
    for r in report["summary"]:
        lines.append(f"| {r['path']} | {r['dtype']} | {r['quantity']} | {r['error']:.3g} | {r['ceiling']:.3g} | "
                     f"{'pass' if r['ok'] else 'FAIL'} | {r['case']} |")
    if failed:
        lines += ["", "## Failed rows", ""]
        lines += [f"- {r['path']} {r['dtype']} {r['case']}: {r['quantity']} {r['error']:.3g} > {r['ceiling']:.3g}"
                  for r in failed]
    lines += ["", "## Everything (JSON)", "", "```json", json.dumps(report, indent=1), "```", ""]
    return "\n".join(lines)


def write_report(file: str | Path, result: dict) -> Path:
    """Write the report to `file` (JSON; Markdown with the JSON inside for a .md name); returns its path."""
    path = Path(file)
    report = build_report(result)
    text = to_markdown(report) if path.suffix.lower() == ".md" else json.dumps(report, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
