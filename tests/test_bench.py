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
    for flag in ("--quick", "--device", "--out", "--d-in", "--k", "--sides", "--candidates"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_quick_torch_sides(tmp_path):
    sides = "ours" + (",sparsify" if HAVE_SPARSIFY else "")
    results, md = _run_bench(tmp_path, "--no-mlx", "--sides", sides, "--candidates")
    (entry,) = results["configs"]
    assert entry["time"]["ok"], entry["time"]
    assert set(entry["time"]["sides"]) == set(sides.split(","))
    for side, mem in entry["memory"].items():
        assert mem["ok"], (side, mem)
        assert mem["tensor"]["peak_bytes"] > 0
    assert {m["side"] for m in results["memory_auxk_off"]} == set(sides.split(","))
    kernels = results["kernels"]
    assert kernels["ok"], kernels
    # the quick config has 102 dead latents, k_aux 32: the coder takes the dense-subset AuxK path, and says so
    assert "SparseCoder takes subset_decode here" in kernels["auxk_path"] and kernels["auxk_path"] in md
    (aux_rows,) = kernels["auxk_backward"].values()
    assert aux_rows["ours subset_decode (dense-subset AuxK: encoder AND decoder backward)"]["median_s"] > 0
    if not torch.cuda.is_available():
        for prims in kernels["candidates"].values():
            for impls in prims.values():
                assert "sae_torch (current)" in impls
                assert all(r["max_abs_err_vs_current"] < 1e-4 for r in impls.values()), impls
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


def test_candidates_match_sae_torch():
    """Every alternative kernel in bench/candidates.py computes what sae_torch's primitive of the same role computes
    (their timings are only worth comparing if so), on a light and on a heavy index set (top-k and AuxK-like)."""
    from bench import candidates as C
    from sae_torch.kernels import sparse_rows as sr

    g = torch.Generator().manual_seed(0)
    n, d, m = 50, 24, 40
    for k in (3, 20):  # 150 <= 16 m: sae_torch's scatter_outer takes CSR; 1000 > 16 m: COO
        idx = torch.randint(0, m, (n, k), generator=g)
        rows, table, w = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g), torch.randn(n, k, generator=g)
        ref = sr.gather_dot_reference(rows, table, idx)
        for name, fn in C.GATHER_DOT.items():
            torch.testing.assert_close(fn(rows, table, idx), ref, msg=name)
        ref = sr.scatter_outer_reference(w, idx, rows, m)
        for name, fn in C.SCATTER_OUTER.items():
            torch.testing.assert_close(fn(w, idx, rows, m), ref, msg=name)


@pytest.mark.slow
def test_quick_profile_grid_and_variants(tmp_path):
    """--profile-only over a two-point grid (dead fractions 0 and 0.3) with two variant sides: the per-kernel table
    of every side is printed, written to profile.txt and recorded; no timing or memory runs."""
    results, md = _run_bench(tmp_path, "--profile-only", "--dead-frac", "0,0.3",
                             "--variants", "topk=triton;scatter=dot,aux_ratio=0", "--sides", "ours")
    names = [e["config"]["name"] for e in results["configs"]]
    assert names == ["d64_M2048_k8_N256_noaux", "d64_M2048_k8_N256_dead0.3"]
    text = (tmp_path / "profile.txt").read_text()
    for entry in results["configs"]:
        assert "time" not in entry and "memory" not in entry
        prof = entry["profile"]
        assert prof["ok"], prof
        assert set(prof["sides"]) == {"ours", "ours[topk=triton]", "ours[scatter=dot,aux_ratio=0]"}
        for side, v in prof["sides"].items():
            assert v["wall_s_per_step"] > 0 and v["top"] and v["top"][0]["self_s_per_step"] > 0
            assert f"--- {side}: " in text
        assert f"===== {entry['config']['name']} =====" in text
    assert "aten::topk" in text  # the default selection, on CPU (the Triton one needs CUDA or the interpreter)
    assert "not timed (--profile-only" in md


def test_variant_and_grid_flags_are_checked():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--variants", "topk"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--variants: 'topk' is not key=value" in proc.stderr
    from bench.common import parse_variant, side_settings

    assert parse_variant("topk=triton,aux_ratio=32") == {"selection_kernel": "triton", "aux_dense_max_ratio": 32.0}
    assert side_settings("ours[scatter=dot]") == {"scatter_kernel": "dot"} and side_settings("ours") == {}


@pytest.mark.slow
def test_gpu_check_runs_in_the_interpreter(tmp_path):
    """bench.gpu_check (run by bench/gpu_session.sh on a GPU) on CPU through Triton's interpreter, tiny shapes: the
    variants agree with the defaults (values, errors, losses), so the script a GPU session runs does not rot."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "SAE_TRITON_CPU": "1",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--reps", "1",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    (sel,) = res["selection"]
    assert sel["triton max same values"] and sel["triton bitonic same values"]
    (sc,) = res["scatter_outer"]
    assert sc["triton dot max rel err"] <= 2.0**-7 and sc["triton segment max rel err"] <= 2.0**-7  # bf16 output
    assert len(res["coder_step"]) == 4
    for row in res["coder_step"]:
        assert abs(row["fvu"] - row["fvu default"]) <= 1e-5 * row["fvu default"], row
        assert abs(row["auxk"] - row["auxk default"]) <= 1e-5 * row["auxk default"], row
        assert row["worst grad rel diff"] <= 1e-5, row
