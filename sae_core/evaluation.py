"""The framework-free half of `sae eval`: which run, model, text and hookpoints; the running sums and the metric
arithmetic; the report. `sae_torch.eval` and `sae_mlx.eval` only run the model and the coders and hand their
per-batch numbers (as Python floats / NumPy arrays) to :class:`CoderTotals` and :class:`LossTotals`, so both
backends report the same quantities, computed the same way.

Per coder, over the evaluation tokens (excluded tokens such as BOS left out, as in training):
    fvu       sum of squared errors / total variance of the targets, over all evaluation tokens (float64 sums)
    l0        mean number of latents with activation > 0 per token
    dead_pct  % of latents that fire on none of the evaluation tokens
With the coder spliced into the model (the hookpoint module's output replaced by the coder's reconstruction at the
trained-on positions; a transcoder reconstructs the output from the module's input), next-token CE loss over the
evaluation sequences:
    ce_spliced, ce_increase = ce_spliced - ce_clean,
    ce_zero   with the output zeroed at the same positions instead,
    loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)    (1: as good as the clean model, 0: as bad
                                                                       as ablating the hookpoint)
    kl        mean over tokens of KL(clean next-token distribution || spliced one)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import write_text_atomic
from .data import default_exclude_tokens, load_token_chunks
from .errors import UserError
from .train_config import TrainConfig
from .training_state import STATE_FILE, find_coder_dirs, needs_recovery, read_run_state

EVAL_FILE = "eval.json"


@dataclass
class EvalPlan:
    """What to evaluate: the run's coders, its config (the defaults for model, text, batch size), the options."""

    run: Path
    state: dict | None
    cfg: TrainConfig
    coder_dirs: dict[str, Path]
    model: str
    dataset: str
    split: str
    max_tokens: int | None
    batch_size: int
    text_column: str

    def hookpoint(self, name: str) -> str:
        """The module a coder was trained on: from state.json, else its folder name (`layers.3/seed1` -> layers.3)."""
        coders = (self.state or {}).get("coders", {})
        return coders[name]["hookpoint"] if name in coders else name.split("/")[0]

    def exclude_tokens(self, tokenizer) -> list[int]:
        return default_exclude_tokens(tokenizer) if self.cfg.exclude_tokens is None else self.cfg.exclude_tokens

    def token_chunks(self, tokenizer) -> np.ndarray:
        """The held-out [chunks, ctx_len] tokens, at most max_tokens of them (at least one chunk)."""
        chunks = load_token_chunks(self.dataset, self.split, tokenizer, self.cfg.ctx_len, self.max_tokens,
                                   self.text_column)
        if self.max_tokens is not None:
            chunks = chunks[: max(1, self.max_tokens // self.cfg.ctx_len)]
        return chunks


def plan_evaluation(run: str | Path, *, model: str | None = None, dataset: str | None = None, split: str = "test",
                    max_tokens: int | None = 32768, batch_size: int | None = None,
                    text_column: str | None = None) -> EvalPlan:
    """Check the run folder (or a single hookpoint folder) and resolve every option against the run's config;
    user mistakes raise UserError."""
    run = Path(run).expanduser()
    if not run.exists():
        raise UserError(f"run folder {run} not found")
    # a folder that never held a run of ours (a published repo, e.g. a huggingface_hub snapshot whose files are
    # links into its blob store) is read as weights only: nothing to recover, no state to check
    ours = os.path.lexists(run / STATE_FILE) or needs_recovery(run)
    state = read_run_state(run) if ours else None
    cfg = TrainConfig.from_dict(state["train_config"]) if state else TrainConfig()
    if state is None and model is None and not (run / "cfg.json").is_file():
        raise UserError(f"{run} holds no state.json (not a run folder of `sae train`); give --model and --dataset")
    dirs = {run.name: run} if (run / "cfg.json").is_file() else find_coder_dirs(run)
    if not dirs:
        raise UserError(f"{run} holds no coder folders (cfg.json + sae.safetensors)")
    if cfg.activations and model is None:
        raise UserError("this run was trained from an activation cache; give --model (and --dataset) to evaluate")
    return EvalPlan(run=run, state=state, cfg=cfg, coder_dirs=dirs, model=model or cfg.model,
                    dataset=dataset or cfg.dataset, split=split, max_tokens=max_tokens,
                    batch_size=batch_size or cfg.batch_size, text_column=text_column or cfg.text_column)


@dataclass
class CoderTotals:
    """Running float64 sums of one coder's reconstruction metrics and spliced-model losses."""

    num_latents: int
    squared_error: float = 0.0
    target_sum: np.ndarray | float = 0.0
    target_square_sum: float = 0.0
    tokens: int = 0
    active: float = 0.0
    fired: np.ndarray = field(default=None)  # bool [num_latents]
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0

    def __post_init__(self):
        if self.fired is None:
            self.fired = np.zeros(self.num_latents, dtype=bool)

    def add_sums(self, squared_error: float, target_sum: np.ndarray, target_square_sum: float, tokens: int,
                 active: float, fired: np.ndarray) -> None:
        """One batch, already reduced (a backend with float64 on its device sums there): sum of squared errors,
        per-dimension sum of the targets [d_out], sum of their squares, token count, number of active
        (token, latent) pairs, and the indices of the latents that fired."""
        self.squared_error += float(squared_error)
        self.target_sum = self.target_sum + np.asarray(target_sum, dtype=np.float64)
        self.target_square_sum += float(target_square_sum)
        self.tokens += int(tokens)
        self.active += float(active)
        self.fired[np.asarray(fired, dtype=np.int64)] = True

    def add_reconstruction(self, target: np.ndarray, reconstruction: np.ndarray, top_acts: np.ndarray,
                           top_indices: np.ndarray) -> None:
        """One batch from host arrays (summed here in float64): target and reconstruction [n, d_out], the coder's
        top_acts / top_indices [n, k]."""
        y = np.asarray(target, dtype=np.float64)
        active = np.asarray(top_acts, dtype=np.float32) > 0
        self.add_sums(np.square(y - np.asarray(reconstruction, dtype=np.float64)).sum(), y.sum(axis=0),
                      np.square(y).sum(), y.shape[0], active.sum(), np.asarray(top_indices)[active])

    def add_losses(self, ce_spliced: float, ce_zero: float, kl: float) -> None:
        """One batch: summed CE (spliced, zero-ablated) and summed KL over its predicted tokens."""
        self.ce_spliced += ce_spliced
        self.ce_zero += ce_zero
        self.kl += kl

    def metrics(self, hookpoint: str, ce_clean: float, ce_count: int) -> dict:
        n = max(self.tokens, 1)
        mean = np.asarray(self.target_sum, dtype=np.float64) / n
        total_variance = self.target_square_sum - n * float((mean * mean).sum())
        ce, ce_zero = self.ce_spliced / ce_count, self.ce_zero / ce_count
        return {
            "hookpoint": hookpoint, "tokens": self.tokens,
            "fvu": self.squared_error / total_variance if total_variance > 0 else float("nan"),
            "l0": self.active / n, "dead_pct": 100.0 * float((~self.fired).mean()),
            "ce_spliced": ce, "ce_zero": ce_zero, "ce_increase": ce - ce_clean,
            "loss_recovered": (ce_zero - ce) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "kl": self.kl / ce_count,
        }


@dataclass
class LossTotals:
    """The clean model's summed next-token CE and the number of predicted tokens."""

    ce_clean: float = 0.0
    count: int = 0

    def add(self, ce_sum: float, count: int) -> None:
        self.ce_clean += ce_sum
        self.count += count


def build_report(plan: EvalPlan, chunks: np.ndarray, clean: LossTotals, totals: dict[str, CoderTotals],
                 hooks: dict[str, str]) -> dict:
    ce_clean = clean.ce_clean / clean.count
    return {"run": str(plan.run), "dataset": plan.dataset, "split": plan.split, "tokens": int(chunks.size),
            "ce_clean": ce_clean,
            "coders": {name: t.metrics(hooks[name], ce_clean, clean.count) for name, t in totals.items()}}


def write_report(plan: EvalPlan, report: dict) -> None:
    """eval.json in the run folder (only for a run folder of `sae train`)."""
    if plan.run.is_dir() and plan.state is not None:
        write_text_atomic(plan.run / EVAL_FILE, json.dumps(report, indent=1) + "\n")
