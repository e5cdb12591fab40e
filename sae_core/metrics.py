"""What a run reports: the JSONL metrics log, the PNG plots, the summary line. Framework-free.

`metrics.jsonl` in the run folder holds one JSON object per logged step, with sparsify's wandb key names:
    step, tokens, lr, tokens_per_s, elapsed_s,
    fvu/<coder>, auxk/<coder>, multi_topk_fvu/<coder>, dead_pct/<coder>, l0/<coder>
(averages over the steps since the previous line; dead_pct in percent of latents). On resume, lines past the
checkpoint's step are dropped, so the log reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .checkpoint import write_text_atomic
from .training_state import METRICS_FILE, PLOTS_DIR, STATE_FILE

KEYS = ("fvu", "auxk", "multi_topk_fvu", "dead_pct", "l0")


class MetricsLog:
    def __init__(self, run: Path, resume_step: int | None = None):
        self.path = Path(run) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # keep what the checkpoint had seen; a resumed run rewrites the rest
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # a line cut short by a crash (or not ours)
            continue
    return records


def coder_stats(fire_count: np.ndarray, tokens_since_fired: np.ndarray, dead_threshold: int) -> dict[str, float]:
    return {
        "dead_pct": 100.0 * float(np.mean(tokens_since_fired >= dead_threshold)),
        "never_fired_pct": 100.0 * float(np.mean(fire_count == 0)),
    }


def summary_line(name: str, fvu: float, l0: float, dead_pct: float, never_fired_pct: float | None = None) -> str:
    extra = f" (never fired: {never_fired_pct:.1f}%)" if never_fired_pct is not None else ""
    return f"{name}: FVU {fvu:.4f}, L0 {l0:.1f}, dead {dead_pct:.1f}%{extra}"


def print_summary(result: dict) -> None:
    """The end-of-training report: one line for the run, one per coder (FVU, L0 of the last logged steps).

    A coder with no step logged in this session (a resumed run that was already finished, or one stopped before
    its first log line) reports the last values of metrics.jsonl instead of NaN."""
    coders = {name: dict(s) for name, s in result["coders"].items()}
    unlogged = [name for name, s in coders.items() if not math.isfinite(s["fvu"])]
    logged_at = {}
    for record in read_metrics(result["run_dir"]) if unlogged else []:
        for name in unlogged:
            if isinstance(record.get(f"fvu/{name}"), (int, float)):
                coders[name].update(fvu=record[f"fvu/{name}"], l0=record.get(f"l0/{name}") or float("nan"))
                logged_at[name] = record.get("step")
    total = _saved_total_steps(result["run_dir"])
    if unlogged and len(unlogged) == len(coders) and total is not None and result["step"] >= total:
        print(f"Nothing to train: the run in {result['run_dir']} was already finished ({result['step']} of "
              f"{total} steps, {result['tokens']:,} tokens). To train longer, resume with a larger --max_tokens. "
              f"Its last logged metrics:")
    else:
        verb = "Interrupted" if result["interrupted"] else "Done"
        print(f"{verb}: {result['step']} steps, {result['tokens']:,} tokens in {result['elapsed_s']:.0f} s; "
              f"checkpoint in {result['run_dir']}")
    for name, s in coders.items():
        line = summary_line(name, s["fvu"], s["l0"], s["dead_pct"], s["never_fired_pct"])
        if name in unlogged:
            line += f" [logged at step {logged_at[name]}]" if name in logged_at else " [no step logged yet]"
        print(line)


def _saved_total_steps(run) -> int | None:
    try:
        total = json.loads((Path(run) / STATE_FILE).read_text()).get("total_steps")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return total if isinstance(total, int) else None


def print_eval(report: dict) -> None:
    """The `sae eval` report: per coder FVU, L0, dead % on held-out tokens and the spliced-model losses."""
    print(f"Evaluated on {report['tokens']:,} held-out tokens ({report['dataset']}, split {report['split']}); "
          f"clean CE loss {report['ce_clean']:.4f}")
    for name, r in report["coders"].items():
        print(f"{name}: FVU {r['fvu']:.4f}, L0 {r['l0']:.1f}, dead {r['dead_pct']:.1f}% (no fire on these tokens); "
              f"CE {r['ce_spliced']:.4f} (+{r['ce_increase']:.4f}), zero-ablation CE {r['ce_zero']:.4f}, "
              f"loss recovered {r['loss_recovered']:.3f}, KL {r['kl']:.4f}")


def plot_run(run: Path, fire_counts: dict[str, np.ndarray], tokens: int) -> list[Path]:
    """Write plots/loss.png (FVU and AuxK vs tokens; L0 and dead % below) and plots/firing_<coder>.png (histogram
    of each latent's firing frequency, log10 of fires per token). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    out_dir = run / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    records = read_metrics(run)
    coders = list(fire_counts)
    if records:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
        x = [r["tokens"] for r in records]
        for name in coders:
            fvu = [r.get(f"fvu/{name}") for r in records]
            top.plot(x, fvu, label=f"FVU {name}")
            aux = [r.get(f"auxk/{name}") for r in records]
            if any(a for a in aux if a):
                top.plot(x, aux, "--", label=f"AuxK {name}")
            mt = [r.get(f"multi_topk_fvu/{name}") for r in records]
            if any(a for a in mt if a):
                top.plot(x, mt, ":", label=f"Multi-TopK FVU {name}")
            bottom.plot(x, [r.get(f"l0/{name}") for r in records], label=f"L0 {name}")
            bottom.plot(x, [r.get(f"dead_pct/{name}") for r in records], "--", label=f"dead % {name}")
        top.set_yscale("log")
        top.set_ylabel("loss")
        top.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=7)
        bottom.set_xlabel("tokens")
        bottom.set_ylabel("L0 / dead %")
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=7)
        fig.suptitle(run.name)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.93, bottom=0.08, hspace=0.08)
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for name, counts in fire_counts.items():
        counts = np.asarray(counts, dtype=np.float64)
        fig, ax = plt.subplots(figsize=(7, 4))
        fired = counts[counts > 0]
        if len(fired) and tokens > 0:
            ax.hist(np.log10(fired / tokens), bins=60)
        ax.set_xlabel("log10(firing frequency: fires per token)")
        ax.set_ylabel("latents")
        ax.set_title(f"{name}: {len(counts)} latents, {int((counts == 0).sum())} never fired in {tokens:,} tokens")
        ax.grid(True, alpha=0.3)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)
        path = out_dir / f"firing_{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
