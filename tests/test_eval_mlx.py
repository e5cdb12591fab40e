"""`sae eval --backend mlx` (what a Mac's `--backend auto` picks): sae_mlx.eval runs the model in mlx-lm and the
coders in MLX and must report what sae_torch.eval reports on the same checkpoints and text (the tiny Llama: both
runners compute its activations to rounding; tests/test_train_mlx.py checks that)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm", reason="the MLX eval runs the model in mlx-lm")

from conftest import run_cli  # noqa: E402
from sae_core.config import SparseCoderConfig  # noqa: E402
from sae_mlx.eval import evaluate as evaluate_mlx  # noqa: E402
from sae_torch.eval import evaluate as evaluate_torch  # noqa: E402
from sae_torch.trainer import train  # noqa: E402

# (relative, absolute) tolerances: the two model runners agree to fp32 rounding and the coders select the same
# latents. KL and the CE increase are differences of log-probabilities of about 10 that the runners compute about
# 1e-6 apart, so their floor is absolute (seen: KL 4.4475e-4 vs 4.4535e-4 on the transcoder).
CLOSE = {"fvu": (1e-4, 0), "l0": (1e-6, 0), "ce_spliced": (1e-5, 0), "ce_zero": (1e-5, 0),
         "ce_increase": (1e-3, 2e-6), "loss_recovered": (1e-3, 0), "kl": (1e-3, 2e-6)}


def assert_same_report(mlx_report: dict, torch_report: dict) -> None:
    assert mlx_report["tokens"] == torch_report["tokens"] and mlx_report["split"] == torch_report["split"]
    assert mlx_report["ce_clean"] == pytest.approx(torch_report["ce_clean"], rel=1e-5)
    assert mlx_report["coders"].keys() == torch_report["coders"].keys()
    for name, want in torch_report["coders"].items():
        got = mlx_report["coders"][name]
        assert got["hookpoint"] == want["hookpoint"] and got["tokens"] == want["tokens"]
        assert got["dead_pct"] == want["dead_pct"], name
        for key, (rel, absolute) in CLOSE.items():
            assert got[key] == pytest.approx(want[key], rel=rel, abs=absolute), (name, key, got[key], want[key])
        assert np.isfinite(list(got.values())[2:]).all()


@pytest.mark.parametrize("kind", ["sae", "transcoder-skip"])
def test_mlx_eval_matches_torch_eval(tiny_cfg, tmp_path, kind):
    if kind == "sae":
        cfg = tiny_cfg(hookpoints=["layers.2"])
    else:
        cfg = tiny_cfg(hookpoints=["layers.1.mlp"],
                       sae=SparseCoderConfig(k=8, expansion_factor=4, transcode=True, skip_connection=True))
    train(cfg, progress=False, plots=False)
    run = tmp_path / "runs" / "tiny"
    options = dict(max_tokens=32 * 8, batch_size=4, progress=False)
    want = evaluate_torch(run, write_json=False, **options)
    got = evaluate_mlx(run, **options)
    assert_same_report(got, want)
    assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(got))
    r = got["coders"][cfg.hookpoints[0]]
    assert 0 < r["fvu"] and 0 < r["l0"] <= 8 and r["kl"] >= 0


def test_cli_eval_with_the_mlx_backend(tiny_cfg, tmp_path):
    train(tiny_cfg(hookpoints=["layers.2"]), progress=False, plots=False)
    run = tmp_path / "runs" / "tiny"
    proc = run_cli("eval", run, "--backend", "mlx", "--max_tokens", 128, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "layers.2: FVU" in proc.stdout and "loss recovered" in proc.stdout and "KL" in proc.stdout
    report = json.loads((run / "eval.json").read_text())
    assert_same_report(report, evaluate_torch(run, max_tokens=128, progress=False, write_json=False))
    proc = run_cli("eval", run, "--backend", "mlx", "--model", str(tmp_path / "no-such-model"), "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not found" in proc.stderr
