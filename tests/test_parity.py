"""The parity suite runs in CI, and it catches the known bugs when they are injected."""
import json
import os
import subprocess
import sys

import pytest
import torch

from parity.suite import available_paths, run_suite
from sae_torch import SparseCoder
from sae_torch.kernels.sparse_rows import sparse_decode


def failing(rows):
    return sorted({row.quantity for row in rows if not row.ok})


def test_torch_eager_passes_every_case_fp32_and_bf16():
    rows = run_suite(["torch-eager"], ("float32", "bfloat16"))
    assert rows and not failing(rows)


@pytest.mark.parametrize("path", ["mlx-fallback", "mlx-metal", "mlx-compiled", "metal-harness"])
def test_mlx_paths_pass(path):
    reason = available_paths()[path]
    if reason:
        pytest.skip(reason)
    rows = run_suite([path], ("float32", "bfloat16"), quick=True)
    assert rows and not failing(rows)


def test_cli_triton_interpreter_and_json():
    """`python -m parity` runs the Triton kernels through the interpreter in a child process on CPU (started
    without TRITON_INTERPRET, as a user starts it: another test module of this session may have set it)."""
    if available_paths()["torch-triton"]:
        pytest.skip(available_paths()["torch-triton"])
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "parity", "--paths", "torch-eager,torch-triton", "--quick",
                           "--dtypes", "float32", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"], [(r["path"], r["case"], r["quantity"], r["error"]) for r in report["rows"] if not r["ok"]]
    assert {r["path"] for r in report["rows"]} == {"torch-eager", "torch-triton", "step:torch"}
    # the child's rows are its own path's against the oracle: it has no second path to cross-check with
    assert {r["quantity"] for r in report["rows"] if r["path"] == "torch-triton"} >= {"sae_out", "grad W_dec"}
    # the kernels that ran: the Triton ones in the child process, the references in torch-eager
    assert set(report["kernels"]["torch-triton"]) >= {"gather_weighted_sum_triton", "gather_dot_triton",
                                                      "scatter_outer_triton"}
    assert not any(name.endswith("_triton") for name in report["kernels"]["torch-eager"])


@pytest.mark.parametrize("path", ["torch-eager", "mlx-fallback", "mlx-compiled", "metal-harness"])
def test_suite_reports_the_kernels_each_path_ran(path):
    reason = available_paths()[path]
    if reason:
        pytest.skip(reason)
    kernels = {}
    run_suite([path], ("float32",), quick=True, kernels=kernels)
    on_metal = available_paths()["mlx-metal"] is None  # mlx-compiled runs the Metal kernels where they run
    kind = "_metal" if path == "metal-harness" or (path == "mlx-compiled" and on_metal) else "_reference"
    expected = {f"{name}{kind}" for name in ("gather_weighted_sum", "gather_dot", "scatter_outer")}
    # the dense-subset AuxK runs eagerly only: the compiled AuxK has a fixed size, through the sparse kernels
    assert set(kernels[path]) == expected | ({"subset_decode"} if path != "mlx-compiled" else set()), kernels


@pytest.mark.parametrize("suffix", [".json", ".md"])
def test_cli_report_file(tmp_path, suffix):
    """`--report FILE`: the machine, versions, every row (the step check's too) and the kernels, in one file."""
    file = tmp_path / f"report{suffix}"
    done = subprocess.run([sys.executable, "-m", "parity", "--paths", "torch-eager", "--quick", "--dtypes",
                           "float32", "--report", str(file)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = file.read_text()
    if suffix == ".md":
        assert text.startswith("# sae-twins parity: PASS") and "| torch-eager | float32 | sae_out |" in text
        text = text.split("```json\n", 1)[1].rsplit("```", 1)[0]
    report = json.loads(text)
    assert report["ok"] and report["checked"] == ["torch-eager"]
    assert report["machine"]["architecture"] and report["machine"]["cpu_count"] >= 1
    assert report["versions"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}." \
        f"{sys.version_info.micro}" and report["versions"]["torch"] == torch.__version__
    assert {"torch-eager", "step:torch"} == {r["path"] for r in report["rows"]}
    assert len(report["rows"]) > len(report["summary"]) and all(r["ok"] for r in report["rows"])
    assert "gather_dot_reference" in report["kernels"]["torch-eager"]
    assert report["paths"]["mlx-metal"] == available_paths()["mlx-metal"]  # skipped paths keep their reason


def test_cli_report_needs_an_existing_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "parity", "--report", str(tmp_path / "missing" / "r.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--report" in done.stderr and "Traceback" not in done.stderr


def test_cli_rejects_unknown_path():
    done = subprocess.run([sys.executable, "-m", "parity", "--paths", "torch-magic"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown path(s) torch-magic" in done.stderr


# ---- known-bug guards: each bug, injected, makes the suite fail ----

class BDecDoubleCount(SparseCoder):
    """AuxK with e_hat + b_dec: the target becomes e - b_dec and b_dec gets a spurious gradient."""

    def auxk_loss(self, e, e_hat, num_dead, total_variance):
        return super().auxk_loss(e, e_hat + self.b_dec, num_dead, total_variance)


class AuxKWithoutEncoderGradient(SparseCoder):
    """sparsify's fused encoder: AuxK reads the pre-activations without a gradient, so it never trains the encoder."""

    def aux_reconstruction(self, x_in, bias, dead_pre, dead):
        slots = self._aux_slots(dead_pre)
        return sparse_decode(self.gather_chosen(dead_pre, slots), dead[slots], self.W_dec)


class MultiTopKOverwritesOutputs(SparseCoder):
    """Multi-TopK that replaces the k outputs with the 4k ones."""

    def select_indices(self, pre_acts):
        return self.multi_topk_indices(pre_acts) if self.cfg.multi_topk else super().select_indices(pre_acts)


@pytest.mark.parametrize("bug, expected", [
    (BDecDoubleCount, {"auxk_loss", "grad b_dec"}),
    (AuxKWithoutEncoderGradient, {"grad encoder.weight", "grad encoder.bias"}),
    (MultiTopKOverwritesOutputs, {"selection", "index sets (entries > 0, no near-ties)"}),
])
def test_suite_catches_injected_bug(bug, expected):
    rows = run_suite(["torch-eager"], ("float32",), quick=True, coder_cls=bug)
    assert expected <= set(failing(rows)), failing(rows)
    assert not failing(run_suite(["torch-eager"], ("float32",), quick=True))  # the real coder passes the same cases


class AuxKTakesEveryDeadLatent(SparseCoder):
    """k_aux = num_dead instead of min(d_out // 2, num_dead): a valid selection, of the wrong size."""

    def _aux_slots(self, dead_pre):
        return dead_pre.topk(dead_pre.shape[-1], dim=-1, sorted=False).indices


def test_suite_catches_a_wrong_auxk_count():
    rows = run_suite(["torch-eager"], ("float32",), quick=True, coder_cls=AuxKTakesEveryDeadLatent)
    assert "aux count" in failing(rows), failing(rows)


def _swapping_writer(real):
    """A checkpoint writer that swaps encoder.weight and W_dec whenever their shapes are equal (d_in == d_out)."""

    def write(folder, cfg, d_in, d_out, tensors):
        tensors = dict(tensors)
        if tensors["encoder.weight"].shape == tensors["W_dec"].shape:
            tensors["encoder.weight"], tensors["W_dec"] = tensors["W_dec"], tensors["encoder.weight"]
        return real(folder, cfg, d_in, d_out, tensors)

    return write


def test_suite_compares_with_the_parameters_it_made(monkeypatch):
    """The oracle evaluates the fixture's parameters, not what a path read back: a swapping writer fails."""
    import parity.fixtures

    monkeypatch.setattr(parity.fixtures, "save_checkpoint_numpy",
                        _swapping_writer(parity.fixtures.save_checkpoint_numpy))
    rows = run_suite(["torch-eager"], ("float32",), quick=True)
    failed = failing(rows)
    assert {"parameters as loaded (vs the fixture's)", "sae_out", "grad W_dec"} <= set(failed), failed
    # only the autoencoders (equal shapes) fail
    assert {r.case for r in rows if not r.ok} == {r.case for r in rows if "transcoder" not in r.case}


def test_parity_runs_mlx_matmuls_in_full_fp32_unless_told_otherwise():
    """MLX's TF32 default (Apple GPUs with matrix units) would put fp32 rows past their 1e-4 ceilings: importing
    parity turns it off before MLX loads, and keeps a user's explicit setting."""
    code = "import parity, os; print(os.environ['MLX_ENABLE_TF32'])"
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "0"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "MLX_ENABLE_TF32": "1"}, check=True)
    assert done.stdout.strip() == "1"
