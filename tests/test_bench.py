"""Keeps `python -m bench` from rotting: its quickest mode on a tiny config, end to end (no timing is asserted)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
HAVE_SPARSIFY = all(importlib.util.find_spec(m) is not None
                    for m in ("sparsify", "einops", "natsort", "simple_parsing", "schedulefree"))
SPARSIFY_SKIP = ("eai-sparsify is not importable (install: pip install --no-deps eai-sparsify==1.3.3 einops natsort "
                 "schedulefree simple-parsing docstring-parser; see bench/README.md)")


def _run_bench(tmp_path, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    return results, md


def test_help():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0
    for flag in ("--quick", "--device", "--out", "--d-in", "--k", "--sides"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_quick_torch_sides(tmp_path):
    sides = "ours,proposed" + (",sparsify" if HAVE_SPARSIFY else "")
    results, md = _run_bench(tmp_path, "--no-mlx", "--sides", sides)
    (entry,) = results["configs"]
    assert entry["time"]["ok"], entry["time"]
    assert set(entry["time"]["sides"]) == set(sides.split(","))
    for side, mem in entry["memory"].items():
        assert mem["ok"], (side, mem)
        assert mem["tensor"]["peak_bytes"] > 0
    assert {m["side"] for m in results["memory_auxk_off"]} == set(sides.split(","))
    assert results["kernels"]["ok"], results["kernels"]
    assert results["environment"]["cpu_model"] in md
    assert "GPU numbers are not measured yet" in md or torch.cuda.is_available()
    losses = {s: v["losses"][0] for s, v in entry["time"]["sides"].items()}
    # same parameters and data: the first-step losses agree (fp32; the tied-latent choice can differ slightly)
    assert max(losses.values()) - min(losses.values()) <= 1e-4 * max(abs(v) for v in losses.values()), losses
    if not HAVE_SPARSIFY:
        pytest.skip(f"sparsify side not run: {SPARSIFY_SKIP}")


@pytest.mark.slow
def test_quick_mlx_side(tmp_path):
    if importlib.util.find_spec("mlx") is None:
        pytest.skip("mlx is not installed")
    results, md = _run_bench(tmp_path, "--sides", "ours", "--no-memory", "--no-kernels")
    mlx = results["configs"][0]["mlx"]
    assert mlx["ok"], mlx
    if "skipped" in mlx:
        pytest.skip(f"MLX side skipped by the bench: {mlx['skipped']}")
    assert mlx["memory"]["peak_bytes"] > 0
    assert "sae_mlx" in md


def test_proposed_prototype_matches_sae_torch():
    """The prototype in bench/proposed.py computes the same losses and gradients as sae_torch (its numbers are
    only worth reporting if it does)."""
    from bench.proposed import ProposedSparseCoder
    from sae_core.config import SparseCoderConfig
    from sae_torch import SparseCoder

    torch.manual_seed(0)
    d, m, n = 40, 320, 300
    for multi in (False, True):
        for dead_count in (50, 300):  # dense-subset AuxK (few dead) and the sparse AuxK path (many dead)
            cfg = SparseCoderConfig(k=6, num_latents=m, multi_topk=multi)
            a, b = SparseCoder(d, cfg), ProposedSparseCoder(d, cfg)
            b.load_state_dict(a.state_dict())
            with torch.no_grad():
                a.b_dec.normal_()
                b.b_dec.copy_(a.b_dec)
            x = torch.randn(n, d)
            dead = torch.zeros(m, dtype=torch.bool)
            dead[torch.randperm(m)[:dead_count]] = True
            grads, outs = [], []
            for coder in (a, b):
                out = coder(x, dead_mask=dead)
                (out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8).backward()
                outs.append(out)
                grads.append({name: p.grad.clone() for name, p in coder.named_parameters()})
            for field in ("fvu", "auxk_loss", "multi_topk_fvu"):
                ra, rb = float(getattr(outs[0], field)), float(getattr(outs[1], field))
                assert abs(ra - rb) <= 1e-5 * max(abs(ra), 1e-12), (field, ra, rb)
            for name in grads[0]:
                ref = grads[0][name]
                assert (grads[1][name] - ref).abs().max() <= 1e-4 * ref.abs().max(), name
