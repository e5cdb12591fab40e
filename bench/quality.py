"""Quality benchmark: do our defaults train SAEs at least as good as sparsify's, at equal tokens?

    python -m bench.quality                      # CPU scale: synthetic (1M tokens) + real SmolLM2 activations
    python -m bench.quality --scale gpu          # synthetic d=256, 8192 features, M=4096, k=16, ~25M tokens
    python -m bench.quality --no-real            # synthetic only; --no-synthetic: real only

Writes `results.json` (every number and setting), `results.md` (the tables) and `quality.png` (held-out FVU and
dead % against training tokens) to --out.

Design notes: docs/internals.md, section `bench/quality.py`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

HOOK = "layers.7"  # SmolLM2's default hookpoint ((30 + 1) // 4)
SCALES = {
    "cpu": dict(d=64, features=2048, active=10.0, expansion=16, k=8, step_tokens=2048, tokens=1_000_000,
                heldout=65536),
    "gpu": dict(d=256, features=8192, active=10.0, expansion=16, k=16, step_tokens=8192, tokens=24_576_000,
                heldout=131072),
}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic ground truth
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Synthetic:
    d: int
    features: int
    active: float
    seed: int = 0
    exponent: float = 0.7
    offset: float = 2.0
    noise: float = 0.05

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.features, self.d, generator=g, dtype=torch.float64)
        self.directions = (directions / directions.norm(dim=1, keepdim=True)).float()
        p = (torch.arange(self.features, dtype=torch.float64) + 1) ** -self.exponent
        for _ in range(50):  # scale to `active` expected firings per token, with the cap at 1 taken into account
            p = (p * self.active / p.clamp(max=1).sum()).clamp(max=1)
        self.p = p.float()
        mean = torch.randn(self.d, generator=g, dtype=torch.float64)
        self.mean = (mean / mean.norm() * self.offset).float()

    def batch(self, index: int, tokens: int, device: torch.device) -> torch.Tensor:
        """Tokens of batch `index` (training batches count from 0; held-out data uses negative indices). Frequent
        features (p >= 0.02) fire by a Bernoulli draw per token; a rare feature's firings in the batch are a
        Binomial(tokens, p) count placed on uniformly drawn tokens (a repeat merged: at most p / 2 of them), which
        is the same distribution up to that merge and needs ~20 random numbers per token instead of `features`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 2**40)
        frequent = int((self.p >= 0.02).sum())  # p is decreasing
        dense = torch.rand(tokens, frequent, generator=g) < self.p[:frequent]
        tok_d, feat_d = dense.nonzero(as_tuple=True)
        rare_p = self.p[frequent:]
        counts = torch.binomial(torch.full_like(rare_p, tokens), rare_p, generator=g).long()
        feat_r = torch.repeat_interleave(torch.arange(frequent, self.features), counts)
        tok_r = torch.randint(0, tokens, (len(feat_r),), generator=g)
        pairs = torch.unique(torch.cat([feat_d * tokens + tok_d, feat_r * tokens + tok_r]))
        feat, tok = pairs // tokens, pairs % tokens
        magnitude = 0.5 + torch.rand(len(pairs), generator=g)
        x = self.mean.repeat(tokens, 1).index_add_(0, tok, magnitude[:, None] * self.directions[feat])
        return (x + self.noise * torch.randn(tokens, self.d, generator=g)).to(device)


def recovered(w_dec: torch.Tensor, directions: torch.Tensor, threshold: float = 0.9) -> tuple[int, float]:
    """(true features with a decoder row at cosine > threshold, mean over true features of the best cosine)."""
    rows = w_dec.float() / w_dec.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    best = (directions.to(rows.device) @ rows.T).max(dim=1).values
    return int((best > threshold).sum()), float(best.mean())


# ---------------------------------------------------------------------------------------------------------------
# The shared evaluation of a checkpoint's weights
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_metrics(weights: dict[str, torch.Tensor], k: int, batches: list[torch.Tensor]) -> dict:
    """FVU over all held-out tokens (float64 sums) and % of latents never firing on them, for an autoencoder."""
    w_enc, b_enc, w_dec, b_dec = (weights[n].float() for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    fired = torch.zeros(w_enc.shape[0], dtype=torch.bool, device=w_enc.device)
    e2 = s1 = s2 = 0.0
    n = 0
    for x in batches:
        x = x.to(w_enc.device).float()
        pre = torch.relu((x - b_dec) @ w_enc.T + b_enc)
        acts, idx = pre.topk(k, dim=1)
        recon = (acts[:, :, None] * w_dec[idx]).sum(1) + b_dec
        e2 += float((x - recon).double().pow(2).sum())
        s1 = s1 + x.double().sum(0)
        s2 += float(x.double().pow(2).sum())
        n += x.shape[0]
        fired[idx[acts > 0]] = True
    total_variance = s2 - float((s1 * s1).sum()) / n
    return {"fvu": e2 / total_variance, "dead_pct": 100.0 * float((~fired).float().mean())}


def load_weights(folder: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "sae.safetensors"), device=str(device))


def checkpoints(total_steps: int, points: int) -> list[int]:
    return sorted({max(1, round(total_steps * (i + 1) / points)) for i in range(points)})


# ---------------------------------------------------------------------------------------------------------------
# The sides
# ---------------------------------------------------------------------------------------------------------------

def train_ours(cfg, source_factory, run: Path, coder: str, stops: list[int], on_checkpoint) -> dict:
    """Train through sae_torch.trainer.train, pausing at each of `stops` to evaluate the saved checkpoint of
    `coder` (the optimizer's evaluation point). `source_factory()`: a fresh activation source (None:
    cfg.activations)."""
    from sae_torch.trainer import train

    cfg = replace(cfg, save_dir=str(run.parent), run_name=run.name, save_every=10**9, log_every=10)
    start = time.perf_counter()
    result = None
    for i, stop in enumerate(stops):
        last = i == len(stops) - 1
        result = train(cfg, source_factory(), resume=run if i else False, overwrite=not i, progress=False,
                       plots=False, stop_after_steps=None if last else stop)
        on_checkpoint(result["tokens"], run / coder)
    return {"seconds": time.perf_counter() - start, "steps": result["step"], "tokens": result["tokens"]}


def train_sparsify(batches, d_in: int, k: int, expansion: int, steps: int, stops: list[int], on_checkpoint,
                   device, lr: float | None = None, auxk_alpha: float = 0.0,
                   dead_feature_threshold: int = 10_000_000) -> dict:
    """sparsify 1.3.3's SparseCoder and signum optimizer, stepped as sparsify.trainer.Trainer.fit does (fvu loss,
    grad_acc_steps = micro_acc_steps = 1, k_decay_steps 0)."""
    if device.type != "cuda":  # sparsify picks its Triton decoder whenever triton imports; it runs only on CUDA
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(k=k, expansion_factor=expansion), device, dtype=torch.float32)
    lr = lr or 5e-3 / (sae.num_latents / (2**14)) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    tokens = 0
    start = time.perf_counter()
    for step, x in enumerate(batches):
        if step >= steps:
            break
        x = x.to(device).float()
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_feature_threshold if auxk_alpha > 0 else None
        out = sae(x=x, y=x, dead_mask=dead_mask)
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += x.shape[0]
        since_fired[did_fire] = 0
        tokens += x.shape[0]
        if step + 1 in stops:
            opt.eval()
            on_checkpoint(tokens, sae)
            opt.train()
    return {"seconds": time.perf_counter() - start, "steps": min(steps, step + 1), "tokens": tokens, "lr": lr}


def sparsify_weights(sae) -> dict[str, torch.Tensor]:
    return {"encoder.weight": sae.encoder.weight.detach(), "encoder.bias": sae.encoder.bias.detach(),
            "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}


def parse_variant(text: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` -> (NAME, {key: value}) with values parsed as JSON where they parse."""
    name, _, spec = text.partition(":")
    values = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return name, values


def ours_config(base: dict, overrides: dict):
    from sae_core.config import SparseCoderConfig
    from sae_core.train_config import TrainConfig

    sae_keys = {"k", "expansion_factor", "multi_topk"}
    sae = SparseCoderConfig(**{k: v for k, v in {**base, **overrides}.items() if k in sae_keys})
    return TrainConfig(sae=sae, **{k: v for k, v in {**base, **overrides}.items() if k not in sae_keys})


# ---------------------------------------------------------------------------------------------------------------
# Synthetic part
# ---------------------------------------------------------------------------------------------------------------

def run_synthetic(args, work: Path, device) -> dict:
    s = dict(SCALES[args.scale])
    for key in ("tokens", "step_tokens", "d", "features", "active", "expansion", "k"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    problem = Synthetic(s["d"], s["features"], s["active"], seed=args.seed)
    steps = s["tokens"] // s["step_tokens"]
    print(f"synthetic: d={s['d']}, {s['features']} features (~{s['active']} active/token), M={s['d'] * s['expansion']}"
          f", k={s['k']}, {steps} steps of {s['step_tokens']} tokens", file=sys.stderr, flush=True)
    batches = [problem.batch(i, s["step_tokens"], device) for i in range(steps)]
    heldout = [problem.batch(-1 - i, 8192, device) for i in range(s["heldout"] // 8192)]
    stops = checkpoints(steps, args.points)
    sides = {}

    def evaluate(weights):
        row = heldout_metrics(weights, s["k"], heldout)
        row["recovered"], row["mean_max_cos"] = recovered(weights["W_dec"], problem.directions)
        return row

    base = dict(k=s["k"], expansion_factor=s["expansion"], max_tokens=steps * s["step_tokens"],
                device=str(device))
    for name, overrides in ours_sides(args):
        curve = []
        def on_checkpoint(tokens, folder, curve=curve):
            curve.append({"tokens": tokens, **evaluate(load_weights(folder, device))})

        info = train_ours(ours_config(base, overrides), lambda: [{"h": b} for b in batches],
                          work / "runs-synthetic" / name, "h", stops, on_checkpoint)
        sides[name] = {"config": overrides, **info, "curve": curve, **curve[-1]}
        report_side(name, sides[name])
    if "sparsify" in args.sides:
        curve = []
        info = train_sparsify(batches, s["d"], s["k"], s["expansion"], steps, stops,
                              lambda tokens, sae: curve.append({"tokens": tokens,
                                                                **evaluate(sparsify_weights(sae))}), device)
        sides["sparsify"] = {"config": {"lr": info["lr"]}, **info, "curve": curve, **curve[-1]}
        report_side("sparsify", sides["sparsify"])
    return {"setup": {**s, "steps": steps, "seed": args.seed, "exponent": problem.exponent,
                      "offset": problem.offset, "noise": problem.noise}, "sides": sides}


def ours_sides(args) -> list[tuple[str, dict]]:
    sides = [(f"ours-{opt}", {"optimizer": opt}) for opt in ("signum", "adam") if f"ours-{opt}" in args.sides]
    return sides + [parse_variant(v) for v in args.variant]


def report_side(name: str, row: dict) -> None:
    extra = f", recovered {row['recovered']}" if "recovered" in row else ""
    print(f"  {name}: FVU {row['fvu']:.4f}, dead {row['dead_pct']:.1f}%{extra} ({row['seconds']:.0f} s)",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Real part: SmolLM2 activations
# ---------------------------------------------------------------------------------------------------------------

def ensure_cache(path: Path, split: str, max_tokens: int | None) -> Path:
    from sae_core.activation_cache import ActivationCache
    from sae_core.train_config import TrainConfig
    from sae_torch.activations import harvest

    if (path / "manifest.json").is_file():
        return path
    print(f"harvesting SmolLM2 {HOOK} activations ({split} split) into {path}", file=sys.stderr, flush=True)
    harvest(path, TrainConfig(hookpoints=[HOOK], split=split, max_tokens=max_tokens, device="cpu"),
            shard_tokens=16384, progress=False)
    ActivationCache(path)  # readable
    return path


def run_real(args, work: Path, device) -> dict:
    from sae_core.activation_cache import ActivationCache
    from sae_torch.activations import CacheActivationSource
    from sae_torch.eval import evaluate

    cache = ensure_cache(Path(args.cache) if args.cache else work / "cache-train", "train", None)
    heldout_cache = ensure_cache(Path(args.heldout_cache) if args.heldout_cache else work / "cache-test", "test",
                                 None)
    d_in = ActivationCache(cache).widths[HOOK][0]
    step_tokens, k, expansion = args.real_step_tokens, args.real_k, args.real_expansion
    steps = args.real_tokens // step_tokens
    stops = checkpoints(steps, args.points)
    held_batches = max(1, ActivationCache(heldout_cache).total_tokens // 4096)  # one pass (the source cycles)
    held = [x for batch in itertools.islice(CacheActivationSource(heldout_cache, 4096, 0, device).batches(),
                                            held_batches) for x, _ in batch.values()]
    print(f"real: SmolLM2 {HOOK}, d_in={d_in}, M={d_in * expansion}, k={k}, {steps} steps of {step_tokens} tokens, "
          f"{sum(len(h) for h in held)} held-out tokens", file=sys.stderr, flush=True)
    spliced = work / "spliced"  # every side's final SAE, evaluated together by sae_torch.eval.evaluate
    sides = {}
    base = dict(k=k, expansion_factor=expansion, max_tokens=steps * step_tokens, activations=str(cache),
                hookpoints=[HOOK], batch_size=step_tokens // 256, ctx_len=256, device=str(device))
    for name, overrides in ours_sides(args):
        curve = []
        run = work / "runs-real" / name
        def on_checkpoint(tokens, folder, curve=curve):
            curve.append({"tokens": tokens, **heldout_metrics(load_weights(folder, device), k, held)})

        info = train_ours(ours_config(base, overrides), lambda: None, run, HOOK, stops, on_checkpoint)
        sides[name] = {"config": overrides, **info, "curve": curve}
        _copy_coder(run / HOOK, spliced / HOOK / name)
        report_side(name, {**sides[name], **curve[-1]})
    if "sparsify" in args.sides:
        curve = []
        source = CacheActivationSource(cache, step_tokens, 0, device)  # the batches our trainer reads (seed 0)
        batches = (x for batch in source.batches() for x, _ in batch.values())
        final = {}

        def on_checkpoint(tokens, sae):
            curve.append({"tokens": tokens, **heldout_metrics(sparsify_weights(sae), k, held)})
            final["sae"] = sae

        info = train_sparsify(batches, d_in, k, expansion, steps, stops, on_checkpoint, device)
        final["sae"].save_to_disk(spliced / HOOK / "sparsify")  # saved at its eval point (the last checkpoint)
        sides["sparsify"] = {"config": {"lr": info["lr"]}, **info, "curve": curve}
        report_side("sparsify", {**sides["sparsify"], **curve[-1]})
    print("evaluating every side spliced into SmolLM2 (sae_torch.eval.evaluate)", file=sys.stderr, flush=True)
    report = evaluate(spliced, model="builtin:smollm2", dataset="builtin:pydoc", split="test",
                      max_tokens=args.eval_tokens, device=str(device), progress=False, write_json=False)
    for name, side in sides.items():
        side.update(report["coders"][f"{HOOK}/{name}"])
        side["curve_final"] = side["curve"][-1]
    return {"setup": {"hookpoint": HOOK, "d_in": d_in, "k": k, "expansion": expansion, "step_tokens": step_tokens,
                      "steps": steps, "cache_tokens": ActivationCache(cache).total_tokens,
                      "heldout_tokens": sum(len(h) for h in held), "eval_tokens": report["tokens"],
                      "ce_clean": report["ce_clean"]}, "sides": sides}


def _copy_coder(src: Path, dst: Path) -> None:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("cfg.json", "sae.safetensors"):
        shutil.copy2(src / name, dst / name)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = [f"# Quality benchmark ({results['scale']} scale, {results['date']})", ""]
    syn = results.get("synthetic")
    if syn:
        s = syn["setup"]
        lines += [f"## Synthetic: d={s['d']}, {s['features']} true features (~{s['active']} active per token), "
                  f"M={s['d'] * s['expansion']}, k={s['k']}, {s['steps']} steps x {s['step_tokens']} tokens", "",
                  "| side | settings | held-out FVU | dead % | recovered (cos > 0.9) | mean max cos | train s |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in syn["sides"].items():
            lines.append(f"| {name} | {_settings(r['config'])} | {r['fvu']:.4f} | {r['dead_pct']:.1f} | "
                         f"{r['recovered']} | {r['mean_max_cos']:.3f} | {r['seconds']:.0f} |")
        lines.append("")
    real = results.get("real")
    if real:
        s = real["setup"]
        lines += [f"## SmolLM2 {s['hookpoint']}: d_in={s['d_in']}, M={s['d_in'] * s['expansion']}, k={s['k']}, "
                  f"{s['steps']} steps x {s['step_tokens']} tokens ({s['cache_tokens']} cached tokens); "
                  f"evaluated on {s['eval_tokens']} held-out tokens, clean CE {s['ce_clean']:.3f}", "",
                  "| side | settings | FVU | dead % | CE increase | loss recovered | KL | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in real["sides"].items():
            lines.append(f"| {name} | {_settings(r['config'])} | {r['fvu']:.4f} | {r['dead_pct']:.1f} | "
                         f"{r['ce_increase']:.4f} | {r['loss_recovered']:.4f} | {r['kl']:.4f} | {r['seconds']:.0f} |")
        lines.append("")
    lines.append(f"Command: `{results['command']}`")
    return "\n".join(lines) + "\n"


def _settings(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(name, results[name]) for name in ("synthetic", "real") if results.get(name)]
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 4 * len(parts)), squeeze=False)
    for row, (part, data) in enumerate(parts):
        for col, key in enumerate(("fvu", "dead_pct")):
            ax = axes[row][col]
            for name, side in data["sides"].items():
                ax.plot([p["tokens"] for p in side["curve"]], [p[key] for p in side["curve"]], marker="o",
                        label=name)
            ax.set_xlabel("training tokens")
            ax.set_ylabel({"fvu": "held-out FVU", "dead_pct": "% never firing on held-out tokens"}[key])
            ax.set_title(f"{part}: {key}")
            if key == "fvu":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out", default=None, help="output folder [bench/results/quality-<scale>]")
    p.add_argument("--work", default=None, help="folder for run folders and activation caches (kept, so caches are "
                                                "reused) [<tmp>/sae-bench-quality]")
    p.add_argument("--device", default="auto")
    p.add_argument("--sides", default="ours-signum,ours-adam,sparsify",
                   help="comma-separated among ours-signum, ours-adam, sparsify")
    p.add_argument("--variant", action="append", default=[],
                   help="an extra side of ours, NAME:key=value,... with TrainConfig fields (k, expansion_factor "
                        "too), e.g. 'no-auxk:auxk_alpha=0'")
    p.add_argument("--points", type=int, default=8, help="curve points per side [8]")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed [0]")
    p.add_argument("--no-synthetic", dest="synthetic", action="store_false")
    p.add_argument("--no-real", dest="real", action="store_false")
    p.add_argument("--tokens", type=int, default=None, help="synthetic training tokens [scale's]")
    p.add_argument("--step-tokens", type=int, default=None, help="synthetic tokens per step [scale's]")
    p.add_argument("--d", type=int, default=None, help="synthetic d_in [scale's]")
    p.add_argument("--features", type=int, default=None, help="synthetic true features [scale's]")
    p.add_argument("--active", type=float, default=None, help="synthetic features active per token [scale's]")
    p.add_argument("--expansion", type=int, default=None, help="synthetic expansion factor, M = d * this [scale's]")
    p.add_argument("--k", type=int, default=None, help="synthetic k [scale's]")
    p.add_argument("--cache", default=None, help="activation cache to train on [harvested into --out]")
    p.add_argument("--heldout-cache", default=None, help="held-out activation cache [harvested into --out]")
    p.add_argument("--real-tokens", type=int, default=300_000)
    p.add_argument("--real-step-tokens", type=int, default=1024, help="multiple of 256 [1024: the CLI default]")
    p.add_argument("--real-k", type=int, default=32)
    p.add_argument("--real-expansion", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens of the spliced evaluation [16384]")
    args = p.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = Path(args.out or Path(__file__).parent / "results" / f"quality-{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    results = {"scale": args.scale, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
               "device": str(device), "torch": torch.__version__, "load_average": os.getloadavg()}
    work = Path(args.work or Path(tempfile.gettempdir()) / "sae-bench-quality")
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        results["synthetic"] = run_synthetic(args, work, device)
    if args.real:
        results["real"] = run_real(args, work, device)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "quality.png")
    print(markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'quality.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
