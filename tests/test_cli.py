"""The `sae` command in subprocesses: help, exit codes, one-line errors without tracebacks, harvest + train."""
from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest

from conftest import PYTHON, REPO, run_cli


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_help_lists_commands_and_sparsify_flags():
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("train", "eval", "harvest", "convert", "parity"):
        assert command in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0
    for flag in ("--batch_size", "--k", "--expansion_factor", "--hookpoints", "--layers", "--grad_acc_steps",
                 "--micro_acc_steps", "--lr", "--auxk_alpha", "--dead_feature_threshold", "--save_every",
                 "--optimizer", "--run_name", "--resume", "--max_tokens", "--backend", "--average_power"):
        assert flag in train.stdout, flag
    assert "'option_strings'" not in train.stdout  # a "%" in a field docstring is shown as text, not %-formatted
    assert "dead %" in " ".join(train.stdout.split())
    assert run_cli("eval", "--help").returncode == 0
    assert run_cli("harvest", "--help").returncode == 0
    assert run_cli().returncode == 2  # no command: help, exit 2


def test_delegated_commands_have_help():
    convert = run_cli("convert", "--help")
    assert convert.returncode == 0 and "--to" in convert.stdout
    parity = run_cli("parity", "--help")
    if importlib.util.find_spec("parity.__main__") is not None:
        assert parity.returncode == 0
    else:
        assert "not available" in _one_error_line(parity)


def test_flag_validation_errors():
    assert "batch_size must be a positive integer" in _one_error_line(run_cli("train", "--batch_size", "0"))
    assert "ctx_len" in _one_error_line(run_cli("train", "--hookpoints", "a", "--layers", "1", "--ctx_len", "1"))
    bad = run_cli("train", "--optimizer", "sgd")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr  # argparse's own usage error


def test_bad_input_found_before_any_backend_is_imported(tmp_path):
    line = _one_error_line(run_cli("train", "--model", tmp_path / "no-model", "--save_dir", tmp_path))
    assert "model" in line and "not found" in line
    line = _one_error_line(run_cli("train", "--dataset", tmp_path / "missing.jsonl"))
    assert "dataset" in line and "not found" in line
    assert "not found" in _one_error_line(run_cli("eval", tmp_path / "no-run"))
    assert "nothing to resume" in _one_error_line(run_cli("train", "--resume", tmp_path / "no-run"))
    assert "unknown built-in dataset" in _one_error_line(run_cli("harvest", tmp_path / "c", "--dataset", "builtin:x"))


@pytest.mark.slow
def test_unknown_hookpoint_is_one_line_with_near_matches(tiny_model_dir, tmp_path):
    line = _one_error_line(run_cli("train", "--model", tiny_model_dir, "--save_dir", tmp_path, "--quiet",
                                   "--hookpoints", "layers.1.mpl"))
    assert "unknown hookpoint 'layers.1.mpl'" in line and "did you mean layers.1.mlp" in line


@pytest.mark.slow
def test_harvest_then_train_from_the_cache_via_the_cli(tiny_model_dir, tmp_path):
    cache = tmp_path / "acts"
    harvest = run_cli("harvest", cache, "--model", tiny_model_dir, "--layers", "0", "2", "--ctx_len", "32",
                      "--max_tokens", "2048", "--quiet")
    assert harvest.returncode == 0, harvest.stderr
    assert "sae train --activations" in harvest.stdout
    manifest = json.loads((cache / "manifest.json").read_text())
    assert list(manifest["hookpoints"]) == ["layers.0", "layers.2"] and manifest["total_tokens"] == 64 * 31
    train = subprocess.run([PYTHON, "-m", "sae_torch", "train", "--activations", cache, "--hookpoints", "layers.2",
                            "--ctx_len", "32", "--max_tokens", "1024", "--k", "4", "--expansion_factor", "2",
                            "--save_dir", tmp_path / "runs", "--run_name", "fromcache", "--quiet"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    assert "layers.2: FVU" in train.stdout and "L0" in train.stdout and "dead" in train.stdout
    assert (tmp_path / "runs" / "fromcache" / "layers.2" / "sae.safetensors").is_file()
