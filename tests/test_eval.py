"""`sae eval` / sae_torch.eval.evaluate: held-out FVU, L0, dead %, and the spliced-model losses."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from sae_core.metrics import read_metrics  # noqa: E402
from sae_torch.eval import evaluate  # noqa: E402
from sae_torch.trainer import train  # noqa: E402


@pytest.mark.slow
def test_smollm2_run_fvu_falls_and_eval_is_sane(tmp_path, smollm2_path):
    """The real model: SmolLM2-135M, default coder (k=32, M=18432) on one residual hookpoint. FVU falls during
    training; spliced in, the coder keeps CE loss between the clean model's and zero-ablation's, so the fraction
    of loss recovered lies in (0, 1]."""
    from sae_core.train_config import TrainConfig

    # 1,024-token steps, the CLI's: the default lr scales with the step's tokens (a quarter of this at 256)
    cfg = TrainConfig(hookpoints=["layers.3"], ctx_len=64, batch_size=16, max_tokens=64 * 16 * 24,
                      save_dir=str(tmp_path), run_name="smol", log_every=3)
    result = train(cfg, progress=False, plots=False)
    fvus = [r["fvu/layers.3"] for r in read_metrics(tmp_path / "smol")]
    assert len(fvus) == 8 and fvus[-1] < 0.7 * fvus[0] and fvus == sorted(fvus, reverse=True), fvus
    assert result["coders"]["layers.3"]["fvu"] == pytest.approx(fvus[-1])
    report = evaluate(tmp_path / "smol", max_tokens=1024, batch_size=8, progress=False)
    r = report["coders"]["layers.3"]
    assert r["tokens"] == 16 * 63  # 16 held-out chunks of 64 tokens, BOS excluded
    assert 0 < r["fvu"] < 1 and 0 < r["l0"] <= 32 and 0 <= r["dead_pct"] < 100
    assert report["ce_clean"] < r["ce_spliced"] < r["ce_zero"]
    assert 0 < r["loss_recovered"] <= 1 and r["kl"] > 0
    assert json.loads((tmp_path / "smol" / "eval.json").read_text())["coders"]["layers.3"]["fvu"] == r["fvu"]


def test_eval_fvu_matches_a_direct_computation(tiny_cfg, tmp_path):
    """On the tiny model: evaluate's FVU equals the coder's FVU computed directly on the same held-out
    activations, and the CLI prints the report."""
    from sae_core.data import load_token_chunks
    from sae_torch import SparseCoder
    from sae_torch.activations import ModelActivationSource, load_model

    train(tiny_cfg(hookpoints=["layers.2"]), progress=False, plots=False)
    run = tmp_path / "runs" / "tiny"
    report = evaluate(run, max_tokens=32 * 8, batch_size=4, progress=False)
    r = report["coders"]["layers.2"]
    model, tokenizer = load_model(tiny_cfg().model, torch.device("cpu"))
    chunks = load_token_chunks("builtin:pydoc", "test", tokenizer, 32, 32 * 8)[:8]
    source = ModelActivationSource(model, ["layers.2"], chunks, 8, 0, False, [tokenizer.bos_token_id])
    x, _ = source.activations(chunks)["layers.2"]
    sae = SparseCoder.load_from_disk(run / "layers.2")
    with torch.no_grad():
        out = sae(x)
    assert r["tokens"] == x.shape[0] == 8 * 31
    assert r["fvu"] == pytest.approx(float(out.fvu), rel=1e-4)
    assert r["l0"] == pytest.approx(float((out.latent_acts > 0).sum(-1).float().mean()), rel=1e-5)
    assert np.isfinite([r["ce_spliced"], r["ce_zero"], r["kl"], report["ce_clean"]]).all()

    proc = run_cli("eval", run, "--max_tokens", 256, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "layers.2: FVU" in proc.stdout and "loss recovered" in proc.stdout and "KL" in proc.stdout
