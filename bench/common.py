"""Shared pieces of the benchmark: configurations, data, the training step, timing, the environment description.

Everything here imports torch lazily-enough to be used by the orchestrating process and by the workers alike.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

from sae_core.loop import total_loss

AUXK_ALPHA = 1 / 32  # docs/SPEC.md section 3 default (ours); sparsify's default is 0, so both are given this explicitly
SIGNUM_MOMENTUM = 0.95


@dataclass(frozen=True)
class BenchConfig:
    d_in: int
    k: int
    n_tokens: int = 4096
    expansion: int = 32
    dead_frac: float = 0.05  # fraction of latents marked dead (AuxK on); 0 turns AuxK off
    multi_topk: bool = False
    seed: int = 0

    @property
    def num_latents(self) -> int:
        return self.d_in * self.expansion

    @property
    def num_dead(self) -> int:
        return int(round(self.dead_frac * self.num_latents))

    @property
    def name(self) -> str:
        aux = f"dead{self.dead_frac:g}" if self.dead_frac > 0 else "noaux"
        return (f"d{self.d_in}_M{self.num_latents}_k{self.k}_N{self.n_tokens}_{aux}"
                + ("_multi" if self.multi_topk else ""))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "num_latents": self.num_latents, "num_dead": self.num_dead,
                "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def sparsify_available() -> tuple[bool, str]:
    """(importable?, reason). Checks the distribution without importing it (the import costs seconds)."""
    if importlib.util.find_spec("sparsify") is None:
        return False, "eai-sparsify is not installed (see bench/README.md, 'Installing sparsify')"
    v = package_version("eai-sparsify")
    missing = [m for m in ("einops", "natsort", "simple_parsing", "schedulefree", "transformers", "datasets",
                           "accelerate", "huggingface_hub") if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"eai-sparsify {v} is installed but its import needs {', '.join(missing)}"
    return True, f"eai-sparsify {v}"


def mlx_available() -> tuple[bool, str]:
    if importlib.util.find_spec("mlx") is None:
        return False, "mlx is not installed"
    return True, "mlx importable (the backend itself is checked in the worker)"


def describe_environment(device: str) -> dict:
    import torch

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "eai_sparsify": package_version("eai-sparsify"),
        "mlx": package_version("mlx"),
        "load_average_at_start": _loadavg(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    if device == "mps":
        env["gpu"] = f"Apple silicon GPU (MPS), macOS {platform.mac_ver()[0]}"
    return env


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Data, models, the step
# ---------------------------------------------------------------------------------------------------------------


def make_data(cfg: BenchConfig, device: str):
    """(x [N, d_in] fp32, dead_mask [M] bool), identical for every side: made on CPU from the seed, then moved.

    x has a mean offset and an anisotropic covariance (a random mixing with a decaying spectrum), like residual
    stream activations; the dead latents are a seeded random subset of dead_frac * M latents."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    d = cfg.d_in
    spectrum = torch.linspace(1.0, 0.1, d)
    mix = torch.randn(d, d, generator=g) / d**0.5 * spectrum[:, None]
    x = torch.randn(cfg.n_tokens, d, generator=g) @ mix + 0.5 * torch.randn(d, generator=g)
    dead = torch.zeros(cfg.num_latents, dtype=torch.bool)
    if cfg.num_dead:
        dead[torch.randperm(cfg.num_latents, generator=g)[: cfg.num_dead]] = True
    return x.to(device), dead.to(device)


def initial_state(cfg: BenchConfig, x):
    """The parameters every side starts from (SPEC 3 init; b_dec = mean of the batch, as both trainers do)."""
    import torch

    from sae_core.config import SparseCoderConfig
    from sae_torch import SparseCoder

    torch.manual_seed(cfg.seed + 1)
    sae = SparseCoder(cfg.d_in, SparseCoderConfig(k=cfg.k, multi_topk=cfg.multi_topk))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0).cpu())
    return {n: t.detach().clone() for n, t in sae.state_dict().items()}


SIDES = ("ours", "sparsify")

# --variants keys: extra "ours" sides whose SparseCoder gets another setting (the attribute named here), so that
# kernels landed behind a setting are timed side by side with the default and with sparsify.
VARIANT_KEYS = {
    "topk": ("selection_kernel", str),  # "torch" (torch.topk) or "triton" (kernels/topk.py)
    "scatter": ("scatter_kernel", str),  # "segment" or "dot" (the Triton scatter_outer, kernels/sparse_rows.py)
    "aux_ratio": ("aux_dense_max_ratio", float),  # dense-subset AuxK up to this many times k_aux dead latents
}


def parse_variant(spec: str) -> dict:
    """'topk=triton,aux_ratio=32' -> {"selection_kernel": "triton", "aux_dense_max_ratio": 32.0}."""
    settings = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in VARIANT_KEYS:
            raise ValueError(f"'{item}' is not key=value with a key from {', '.join(VARIANT_KEYS)}")
        attr, kind = VARIANT_KEYS[key.strip()]
        settings[attr] = kind(value.strip())
    return settings


def side_settings(side: str) -> dict:
    """The SparseCoder settings of a side name: {} for "ours", parse_variant(SPEC) for "ours[SPEC]"."""
    return parse_variant(side[len("ours["):-1]) if side.startswith("ours[") and side.endswith("]") else {}
SIDE_LABELS = {
    "ours": "ours (sae_torch)",
    "sparsify": "sparsify 1.3.3",
    "mlx": "ours (sae_mlx)",
}


def build_side(side: str, cfg: BenchConfig, state: dict, device: str):
    if side == "ours" or side.startswith("ours["):
        from sae_core.config import SparseCoderConfig
        from sae_torch import SparseCoder

        sae = SparseCoder(cfg.d_in, SparseCoderConfig(k=cfg.k, multi_topk=cfg.multi_topk), device=device)
        for attr, value in side_settings(side).items():
            setattr(sae, attr, value)
    elif side == "sparsify":
        import_sparsify(device)
        from sparsify import SparseCoder as TheirCoder
        from sparsify import SparseCoderConfig as TheirConfig

        sae = TheirCoder(cfg.d_in, TheirConfig(k=cfg.k, multi_topk=cfg.multi_topk), device=device)
    else:
        raise ValueError(f"unknown side {side!r}")
    sae.load_state_dict({n: t.to(device) for n, t in state.items()})
    opt = Signum(sae.parameters(), lr=5e-3 / (cfg.num_latents / 2**14) ** 0.5)
    opt.init_state()
    return sae, opt


def import_sparsify(device: str):
    """Import sparsify with its decoder matching the device: its module-level choice is Triton whenever triton
    imports, which fails on CPU tensors, so on CPU it is told to use its eager decoder (embedding_bag)."""
    if "sparsify" not in sys.modules and not device.startswith("cuda"):
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder it picked
        import sparsify  # noqa: F401
        # Imported only for its side effect: the submodule is loaded here, inside the redirect, so what importing
        # it prints is swallowed and callers find it in sys.modules.
        import sparsify.utils  # noqa: F401
    return sys.modules["sparsify"]


class Signum:
    """sign-SGD with momentum (docs/SPEC.md section 3's default optimizer), identical for every torch side:
    m = 0.95 m + 0.05 g; p -= lr * sign(m). (sparsify's trainer wraps its SignSGD in schedulefree's wrapper; the
    benchmark uses one optimizer for all sides so that only the coders differ.)"""

    def __init__(self, params, lr: float):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.moments = None

    def init_state(self):
        import torch

        self.moments = [torch.zeros_like(p) for p in self.params]

    def step(self):
        import torch

        with torch.no_grad():
            pairs = [(p, m) for p, m in zip(self.params, self.moments) if p.grad is not None]
            ps, ms = [p for p, _ in pairs], [m for _, m in pairs]
            gs = [p.grad for p, _ in pairs]
            torch._foreach_mul_(ms, SIGNUM_MOMENTUM)
            torch._foreach_add_(ms, gs, alpha=1 - SIGNUM_MOMENTUM)
            torch._foreach_add_(ps, torch._foreach_sign(ms), alpha=-self.lr)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def train_step(sae, opt, x, dead_mask, device: str, marks: dict | None = None):
    """One training step as sparsify's trainer does it: forward (bf16 autocast on CUDA; sparsify's forward has the
    autocast built in, ours gets the same context here), loss = fvu + auxk_alpha * auxk + multi_topk_fvu / 8,
    backward, remove the decoder-gradient component parallel to the rows, optimizer step, renormalise W_dec rows.
    `marks` (optional) receives time.time_ns() at the phase boundaries (for the memory timeline)."""
    import torch

    def mark(name):
        if marks is not None:
            marks[name] = time.time_ns()

    mark("forward")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        out = sae(x, dead_mask=dead_mask)
    loss = total_loss(out.fvu, out.auxk_loss, out.multi_topk_fvu, AUXK_ALPHA)
    mark("backward")
    loss.backward()
    mark("optimizer")
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    mark("end")
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


class Timer:
    """Wall time on CPU (perf_counter); CUDA events on GPU (synchronised at the end of each measurement); on MPS
    wall time between two `torch.mps.synchronize()` (MPS has events, but a synchronised wall time is what a step
    costs)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.mps = device == "mps"

    def __call__(self, fn):
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        if self.mps:
            import torch

            torch.mps.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.mps.synchronize()
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": [round(t, 5) for t in times]}


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
