"""Seeded NumPy test data shared by every backend (docs/SPEC.md section 4): parameters with b_dec != 0, inputs,
targets, dead masks, and shapes that are not powers of two, for every config variant."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sae_core.checkpoint import save_checkpoint_numpy
from sae_core.config import SparseCoderConfig

DEAD_MASKS = ("none", "few", "many", "all")  # no dead latents, fewer than d_out/2, more than d_out/2, every latent


@dataclass
class Case:
    name: str
    cfg: SparseCoderConfig
    d_in: int
    d_out: int
    params: dict[str, np.ndarray]  # float32, sparsify's tensor names
    x: np.ndarray
    y: np.ndarray | None  # None for an autoencoder (the target is x)
    dead_mask: np.ndarray | None
    auxk_raise_only: bool = False  # the coders run with raise-only AuxK (the trainer's default), the oracle too

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents_for(self.d_in)

    def oracle_kwargs(self) -> dict:
        """What `parity.oracle.evaluate` needs to know about this case besides the arrays."""
        return dict(activation=self.cfg.activation, k=self.cfg.k, transcode=self.cfg.transcode,
                    multi_topk=self.cfg.multi_topk, dead_mask=self.dead_mask, auxk_raise_only=self.auxk_raise_only)

    def rounded_to(self, dtype: str) -> "Case":
        """The parameters and inputs as a backend of this dtype sees them (the oracle must see the same numbers):
        rounded to nearest even, as both frameworks cast."""
        if dtype == "float32":
            return self
        import ml_dtypes

        np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
        cast = lambda a: None if a is None else a.astype(np_dtype).astype(np.float32)
        return replace(self, x=cast(self.x), y=cast(self.y),
                       params={name: cast(value) for name, value in self.params.items()})

    def write(self, folder: Path) -> Path:
        """Write the parameters as a real checkpoint folder (cfg.json + sae.safetensors)."""
        save_checkpoint_numpy(folder, self.cfg, self.d_in, self.d_out, self.params)
        return Path(folder)


def make_params(cfg: SparseCoderConfig, d_in: int, d_out: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    num_latents = cfg.num_latents_for(d_in)
    bound = 1 / np.sqrt(d_in)
    w_dec = rng.normal(size=(num_latents, d_out))
    params = {
        "encoder.weight": rng.uniform(-bound, bound, size=(num_latents, d_in)),
        "encoder.bias": rng.normal(scale=0.05, size=num_latents),
        "W_dec": w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True),
        "b_dec": rng.normal(scale=0.3, size=d_out),
    }
    if cfg.skip_connection:
        params["W_skip"] = rng.normal(scale=0.1, size=(d_out, d_in))
    return {name: value.astype(np.float32) for name, value in params.items()}


def make_dead_mask(kind: str, num_latents: int, d_out: int, rng: np.random.Generator) -> np.ndarray | None:
    half = d_out // 2
    count = {"none": 0, "few": max(1, half // 2), "many": min(num_latents, 3 * half), "all": num_latents}[kind]
    if kind == "none":
        return None
    mask = np.zeros(num_latents, dtype=bool)
    mask[rng.choice(num_latents, size=count, replace=False)] = True
    return mask


def make_case(*, activation="topk", transcode=False, skip_connection=False, multi_topk=False, dead="few",
              n=37, d_in=23, d_out=None, num_latents=120, k=6, seed=0, auxk_raise_only=False) -> Case:
    rng = np.random.default_rng(seed)
    d_out = (19 if transcode else d_in) if d_out is None else d_out
    cfg = SparseCoderConfig(activation=activation, num_latents=num_latents, k=k, multi_topk=multi_topk,
                            skip_connection=skip_connection, transcode=transcode)
    cfg.validate(d_in, d_out)
    params = make_params(cfg, d_in, d_out, rng)
    x = (rng.normal(size=(n, d_in)) * rng.uniform(0.5, 2.0, size=d_in)).astype(np.float32)
    y = None
    if transcode:
        mix = rng.normal(scale=1 / np.sqrt(d_in), size=(d_in, d_out))
        y = (np.tanh(x @ mix) + 0.1 * rng.normal(size=(n, d_out))).astype(np.float32)
    dead_mask = make_dead_mask(dead, num_latents, d_out, rng)
    name = "-".join(
        [activation, "transcoder" if transcode else "sae"]
        + (["skip"] if skip_connection else []) + (["multi"] if multi_topk else []) + [f"dead_{dead}"]
        + (["raise_only"] if auxk_raise_only else [])
    )
    return Case(name, cfg, d_in, d_out, params, x, y, dead_mask, auxk_raise_only)


def all_cases(seed: int = 0) -> list[Case]:
    """Every config variant crossed with every dead mask (a transcoder always has d_out != d_in), and raise-only
    AuxK (the trainer's) on both AuxK paths: few dead latents (dense) and all (sparse)."""
    cases = []
    for activation, transcode, skip, multi in itertools.product(("topk", "groupmax"), (False, True), (False, True),
                                                                (False, True)):
        for dead in DEAD_MASKS:
            cases.append(make_case(activation=activation, transcode=transcode, skip_connection=skip,
                                   multi_topk=multi, dead=dead, seed=seed))
    for dead, transcode in (("few", False), ("all", False), ("many", True)):
        cases.append(make_case(dead=dead, transcode=transcode, seed=seed, auxk_raise_only=True))
    return cases


def case_with(case: Case, **changes) -> Case:
    return replace(case, **changes)
