"""The sparse coder's configuration, with sparsify's field names and defaults (see docs/SPEC.md section 1)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .errors import CheckpointError

ACTIVATIONS = ("topk", "groupmax")


@dataclass
class SparseCoderConfig:
    """Field docstrings are the CLI's --help (sae_core.cli)."""
    activation: str = "topk"
    """Latent selection: topk (k largest) or groupmax (max of each of k groups)."""
    expansion_factor: int = 32
    """Latents per input dimension (M = d_in * expansion_factor when num_latents is 0)."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm."""
    num_latents: int = 0
    """Number of latents M; 0 means d_in * expansion_factor."""
    k: int = 32
    """Active latents per token."""
    multi_topk: bool = False
    """Add the Multi-TopK loss (4k latents, weight 1/8)."""
    skip_connection: bool = False
    """Add a linear skip connection W_skip."""
    transcode: bool = False
    """Train a transcoder: predict the hookpoint module's output from its input."""

    def num_latents_for(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def validate(self, d_in: int, d_out: int | None = None, where: str = "config") -> None:
        """Raise CheckpointError naming `where` if this config cannot describe a coder of these widths."""
        d_out = d_in if d_out is None else d_out
        problems = []
        if self.activation not in ACTIVATIONS:
            problems.append(f"unknown activation {self.activation!r} (expected one of {', '.join(ACTIVATIONS)})")
        for name in ("expansion_factor", "num_latents", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("normalize_decoder", "multi_topk", "skip_connection", "transcode"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(d_in, int) or d_in <= 0 or not isinstance(d_out, int) or d_out <= 0:
            problems.append(f"d_in and d_out must be positive integers, got d_in={d_in!r}, d_out={d_out!r}")
        if problems:
            raise CheckpointError(f"{where}: " + "; ".join(problems))
        num_latents = self.num_latents_for(d_in)
        if num_latents <= 0:
            problems.append("num_latents and expansion_factor are both 0: set one of them")
        if self.k <= 0:
            problems.append(f"k must be at least 1, got {self.k}")
        elif self.k > num_latents:
            problems.append(f"k={self.k} is larger than the number of latents M={num_latents}: lower k")
        if self.activation == "groupmax" and self.k > 0 and num_latents % self.k:
            problems.append(
                f"groupmax needs num_latents divisible by k, but M={num_latents} and k={self.k}: "
                f"choose M a multiple of k"
            )
        if d_out != d_in and not self.transcode:
            problems.append(f"d_out={d_out} differs from d_in={d_in}, which only a transcoder (transcode=true) allows")
        if problems:
            raise CheckpointError(f"{where}: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "SparseCoderConfig":
        """Read the known keys; unknown keys are ignored, as sparsify does."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def config_to_json(cfg: SparseCoderConfig, d_in: int, d_out: int) -> str:
    """sparsify's cfg.json (its fields plus d_in); d_out is added only where it differs from d_in."""
    data = {**cfg.to_dict(), "d_in": d_in}
    if d_out != d_in:
        data["d_out"] = d_out
    return json.dumps(data, indent=2) + "\n"
