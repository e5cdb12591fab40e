"""Training end to end, MLX backend (sae_mlx.trainer, the mirror of sae_torch.trainer): a real SmolLM2 run, exact
resume, Ctrl-C, cross-backend resume (torch -> MLX and MLX -> torch), the mlx-lm model runner, compiled == eager,
metrics and plots, bad input.

Plumbing tests use tiny coders on handed-over arrays or the tiny random Llama of conftest (run by torch, whose
activations the MLX trainer converts: on Linux MLX's CPU matmul is a slow reference BLAS); the real run uses the
built-in SmolLM2.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from conftest import PYTHON, REPO, needs_train_deps  # noqa: E402
from parity.training import (load_run, make_batches, make_init, mlx_trainer, torch_threads,  # noqa: E402
                             torch_trainer, weight_differences)
from sae_core.config import SparseCoderConfig  # noqa: E402
from sae_core.errors import UserError  # noqa: E402
from sae_core.metrics import read_metrics  # noqa: E402
from sae_core.train_config import TrainConfig  # noqa: E402
from sae_core.training_state import read_run_state  # noqa: E402
from sae_mlx import SparseCoder  # noqa: E402
from sae_mlx.trainer import train  # noqa: E402


def _state(run: Path, name: str = "layers.1") -> dict[str, np.ndarray]:
    weights, state = load_run(run, name)
    return {**weights, **state}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), f"{key} differs"


def _array_cfg(tmp_path, run_name, steps, tokens=96, **overrides) -> TrainConfig:
    values = dict(sae=SparseCoderConfig(k=4, expansion_factor=6), optimizer="adam", batch_size=1, ctx_len=tokens,
                  max_tokens=steps * tokens, dead_feature_threshold=3 * tokens, log_every=1, save_every=1000,
                  save_dir=str(tmp_path / "runs"), run_name=run_name, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


# ---- a real run ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_train_deps
def test_smollm2_short_run_fvu_falls(tmp_path, smollm2_path):
    """SmolLM2-135M (run by torch, activations handed to MLX) on one residual hookpoint: FVU falls."""
    cfg = TrainConfig(hookpoints=["layers.3"], ctx_len=64, batch_size=2, max_tokens=64 * 2 * 20,
                      sae=SparseCoderConfig(k=16, expansion_factor=2), optimizer="adam", lr=2e-3,
                      save_dir=str(tmp_path), run_name="smol", log_every=4)
    with torch_threads(1):
        result = train(cfg, progress=False, model_runner="torch")
    fvus = [r["fvu/layers.3"] for r in read_metrics(tmp_path / "smol")]
    assert len(fvus) == 5 and fvus[-1] < 0.8 * fvus[0] and all(a > b for a, b in zip(fvus, fvus[1:])), fvus
    assert result["coders"]["layers.3"]["fvu"] == pytest.approx(fvus[-1])
    state = read_run_state(tmp_path / "smol")
    assert state["backend"] == "mlx" and state["data"]["kind"] == "model" and state["step"] == 20
    sae = SparseCoder.load_from_disk(tmp_path / "smol" / "layers.3")
    assert (sae.d_in, sae.num_latents) == (576, 1152)


# ---- exact resume and Ctrl-C ---------------------------------------------------------------------------------

@needs_train_deps
@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_resume_equals_uninterrupted_run_bitwise(tiny_cfg, tmp_path, optimizer):
    """Pause after 5 of 12 steps (between two saves), resume: every weight, optimizer moment and firing counter
    is bitwise equal to the uninterrupted run's. Uses grad/micro accumulation, AuxK with live dead latents, and two
    hookpoints."""
    opts = dict(optimizer=optimizer, grad_acc_steps=2, micro_acc_steps=2, dead_feature_threshold=64,
                hookpoints=["layers.1", "layers.2"], save_every=4, max_tokens=32 * 4 * 2 * 12,
                sae=SparseCoderConfig(k=8, expansion_factor=4, multi_topk=optimizer == "adam"))
    with torch_threads(1):
        kw = dict(progress=False, plots=False, model_runner="torch")
        full = train(tiny_cfg(run_name="full", **opts), **kw)
        paused = train(tiny_cfg(run_name="paused", **opts), stop_after_steps=5, **kw)
        assert paused["interrupted"] and paused["step"] == 5
        resumed = train(tiny_cfg(run_name="paused", **opts), resume=True, **kw)
    assert resumed["step"] == full["step"] == 12 and resumed["tokens"] == full["tokens"]
    runs = tmp_path / "runs"
    for hook in ("layers.1", "layers.2"):
        _assert_same(_state(runs / "full", hook), _state(runs / "paused", hook))
    state = read_run_state(runs / "paused")
    assert state["step"] == 12 and state["batches"] == 24 and state["backend"] == "mlx"
    full_log, resumed_log = read_metrics(runs / "full"), read_metrics(runs / "paused")
    assert [r["step"] for r in full_log] == [r["step"] for r in resumed_log] == [2, 4, 6, 8, 10, 12]
    same = [r["fvu/layers.1"] for r in full_log if r["step"] != 6]  # step 6's window straddles the pause
    assert same == [r["fvu/layers.1"] for r in resumed_log if r["step"] != 6]
    assert any(r["auxk/layers.1"] > 0 for r in full_log)  # AuxK ran (dead latents existed)


def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    """SIGINT (sent while batch 7 is drawn) finishes that step, saves and returns `interrupted`; the resumed run
    equals the uninterrupted one bitwise."""
    batches = make_batches(12, 96, 24, seed=5)

    def interrupting(at):
        for i, b in enumerate(batches):
            if i == at:
                os.kill(os.getpid(), signal.SIGINT)
            yield {"h": b}

    full = train(_array_cfg(tmp_path, "full", 12), [{"h": b} for b in batches], progress=False, plots=False)
    cut = train(_array_cfg(tmp_path, "cut", 12), interrupting(7), progress=False, plots=False)
    assert cut["interrupted"] and cut["step"] == 8
    assert read_run_state(tmp_path / "runs" / "cut")["step"] == 8
    resumed = train(_array_cfg(tmp_path, "cut", 12), [{"h": b} for b in batches], resume=True, progress=False,
                    plots=False)
    assert not resumed["interrupted"] and resumed["step"] == full["step"] == 12
    _assert_same(_state(tmp_path / "runs" / "full", "h"), _state(tmp_path / "runs" / "cut", "h"))


@pytest.mark.slow
@needs_train_deps
def test_python_m_sae_mlx_ctrl_c_exits_cleanly(tiny_model_dir, tmp_path):
    """`python -m sae_mlx train ...` (the sae CLI, MLX backend): Ctrl-C saves, prints how to resume, exits 130."""
    run = tmp_path / "runs" / "sigint"
    args = ["train", "--model", tiny_model_dir, "--hookpoints", "layers.1", "--ctx_len", 32, "--batch_size", 4,
            "--max_tokens", 32 * 4 * 100000, "--lr", "1e-3", "--k", 8, "--expansion_factor", 4,
            "--save_dir", tmp_path / "runs", "--run_name", "sigint", "--save_every", 1000, "--log_every", 2]
    proc = subprocess.Popen([PYTHON, "-m", "sae_mlx", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SAE_MLX_MODEL_RUNNER": "torch", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no step finished in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "Interrupted" in out and "Resume with: sae train --resume" in out
    state = read_run_state(run)
    assert state["step"] >= 2 and state["backend"] == "mlx"
    SparseCoder.load_from_disk(run / "layers.1")


def test_resume_rejects_changed_settings(tmp_path):
    batches = [{"h": b} for b in make_batches(6, 96, 24, seed=1)]
    train(_array_cfg(tmp_path, "r", 6), batches, progress=False, plots=False, stop_after_steps=2)
    with pytest.raises(UserError, match="cannot resume with different settings.*optimizer"):
        train(_array_cfg(tmp_path, "r", 6, optimizer="signum"), batches, resume=True, progress=False, plots=False)
    with pytest.raises(UserError, match="already holds a checkpoint.*--resume"):
        train(_array_cfg(tmp_path, "r", 6), batches, progress=False, plots=False)


# ---- cross-backend resume --------------------------------------------------------------------------------------

# Adam, same init and batches, 2 x 12 steps (d_in 24, M 144, k 4, dead latents and AuxK active). A run paused on
# one backend and resumed on the other vs the uninterrupted run on the resuming backend, max|diff|/max|ref| over
# weights and moments, measured (seeds 0-2, both directions): 1.7e-6 .. 2.3e-5, the same as between uninterrupted
# torch and MLX runs (the first 12 steps ran on the other backend, whose rounding differs); tokens_since_fired
# identical. The same resume with the optimizer moments zeroed (the negative control below): 1.4e-2 .. 3.0e-2.
CROSS_RESUME_TOL = 2e-4


@needs_train_deps
@pytest.mark.parametrize("first,second", [("torch", "mlx"), ("mlx", "torch")])
def test_cross_backend_resume(tmp_path, first, second):
    import torch

    from sae_core.training_state import write_coder_state
    from sae_torch.trainer import Trainer as TorchTrainer
    from sae_torch.trainer import train as torch_train

    steps, tokens = 24, 96
    batches = make_batches(steps, tokens, 24, seed=3)
    dicts = [{"h": b} for b in batches]
    cfg = _array_cfg(tmp_path, "paused", steps, tokens)
    init = make_init(cfg.sae, 24, seed=3)
    make = {"torch": lambda c, run, **kw: torch_trainer(c, dicts, {"h": init}, run, plots=False, **kw),
            "mlx": lambda c, run, **kw: mlx_trainer(c, dicts, {"h": init}, run, plots=False, **kw)}
    runs = tmp_path / "runs"
    with torch_threads(1):
        paused = make[first](cfg, runs / "paused", stop_after_steps=steps // 2).fit()
        assert paused["interrupted"] and paused["step"] == steps // 2
        assert read_run_state(runs / "paused")["backend"] == first
        make[second](replace(cfg, run_name="full"), runs / "full").fit()
        saved_state = _state(runs / "paused", "h")

        # the resuming backend reads every tensor of the other's state exactly
        saved = read_run_state(runs / "paused")
        if second == "mlx":
            from sae_mlx.trainer import ArrayActivationSource, Trainer

            loaded = Trainer(cfg, ArrayActivationSource(iter(dicts)), runs / "paused", saved, progress=False)
            c = loaded.coders["h"]
            tensors = {k: np.array(v) for k, v in c.opt.state_tensors().items()}
            tensors |= {"tokens_since_fired": np.array(c.tokens_since_fired), "fire_count": np.array(c.fire_count)}
            tensors |= {k: np.array(v) for k, v in c.opt.params.items()}
        else:
            from sae_torch.trainer import ArrayActivationSource as TorchSource

            loaded = TorchTrainer(cfg, TorchSource(iter(dicts)), runs / "paused", saved, torch.device("cpu"),
                                  progress=False, plots=False)
            c = loaded.coders["h"]
            tensors = {k: v.numpy() for k, v in c.opt.state_tensors().items()}
            tensors |= {"tokens_since_fired": c.tokens_since_fired.numpy(), "fire_count": c.fire_count.numpy()}
            tensors |= {k: v.detach().numpy() for k, v in c.sae.named_parameters()}
        _assert_same(saved_state, tensors)
        assert loaded.step == steps // 2 and loaded.batches == steps // 2

        resume_train = train if second == "mlx" else torch_train
        resumed = resume_train(cfg, dicts, resume=runs / "paused", progress=False, plots=False)
        assert resumed["step"] == steps and read_run_state(runs / "paused")["backend"] == second
        diffs = weight_differences(runs / "paused", runs / "full", "h")
        worst = max(v for k, v in diffs.items() if k not in ("tokens_since_fired", "fire_count"))
        assert worst < CROSS_RESUME_TOL, diffs
        assert diffs["tokens_since_fired"] < 0.02  # the same latents died (ties at the threshold aside)
        assert any(r["auxk/h"] > 0 for r in read_metrics(runs / "full"))

        # negative control: the same resume with the optimizer moments zeroed lands far outside the tolerance
        cut = {k: (np.zeros_like(v) if k.startswith("optimizer.") else v) for k, v in saved_state.items()
               if k.startswith("optimizer.") or k in ("tokens_since_fired", "fire_count")}
        make[first](replace(cfg, run_name="zeroed"), runs / "zeroed",
                    stop_after_steps=steps // 2).fit()
        write_coder_state(runs / "zeroed" / "h", cut, "adam", steps // 2)
        resume_train(replace(cfg, run_name="zeroed"), dicts, resume=runs / "zeroed",
                     progress=False, plots=False)
        control = weight_differences(runs / "zeroed", runs / "full", "h")
        assert max(control[k] for k in ("encoder.weight", "W_dec")) > 50 * CROSS_RESUME_TOL, control


# ---- the twin backends agree -------------------------------------------------------------------------------------

@needs_train_deps
def test_backends_agree_with_accumulation_two_hookpoints_and_a_transcoder(tmp_path):
    """8 Adam steps from the same init on both backends: grad_acc_steps 2, micro_acc_steps 3, two transcoders
    with skip connections and Multi-TopK, dead latents: the same weights, moments and counters."""
    rng = np.random.default_rng(7)
    w1, w2 = rng.normal(size=(20, 18)), rng.normal(size=(20, 18))
    xs = [make_batches(16, 90, 20, seed=s) for s in (1, 2)]
    dicts = [{"a": (x1, (x1 @ w1).astype(np.float32)), "b": (x2, np.tanh(x2 @ w2).astype(np.float32))}
             for x1, x2 in zip(*xs)]
    sae = SparseCoderConfig(k=5, expansion_factor=5, transcode=True, skip_connection=True, multi_topk=True)
    cfg = _array_cfg(tmp_path, "r", 8, 90, sae=sae, grad_acc_steps=2, micro_acc_steps=3, dead_feature_threshold=200)
    init = {h: make_init(sae, 20, seed=i, d_out=18) for i, h in enumerate("ab")}
    with torch_threads(1):
        torch_trainer(cfg, dicts, init, tmp_path / "torch", plots=False).fit()
    mlx_trainer(cfg, dicts, init, tmp_path / "mlx", plots=False).fit()
    for hook in "ab":
        diffs = weight_differences(tmp_path / "mlx", tmp_path / "torch", hook)
        assert max(v for k, v in diffs.items()) < 1e-4, (hook, diffs)
    log_t, log_m = read_metrics(tmp_path / "torch"), read_metrics(tmp_path / "mlx")
    for key in ("fvu/a", "auxk/b", "multi_topk_fvu/a", "l0/b", "dead_pct/a"):
        np.testing.assert_allclose([r[key] for r in log_m], [r[key] for r in log_t], rtol=1e-4, atol=1e-7)
    assert any(r["auxk/a"] > 0 for r in log_t)


def test_compile_modes_give_the_same_run(tmp_path):
    """Nothing compiled (the default), the optimizer update compiled, and the forward+backward compiled too give
    the same run, dead latents and AuxK included (micro_acc_steps 2, Multi-TopK)."""
    batches = [{"h": b} for b in make_batches(30, 96, 24, seed=4)]
    sae = SparseCoderConfig(k=4, expansion_factor=6, multi_topk=True)
    for mode in ("off", "update", "all"):
        train(_array_cfg(tmp_path, mode, 30, sae=sae, micro_acc_steps=2, optimizer="signum", lr=3e-3),
              batches, progress=False, plots=False, compiled=mode)
    for mode in ("update", "all"):
        diffs = weight_differences(tmp_path / "runs" / mode, tmp_path / "runs" / "off", "h")
        assert max(diffs.values()) <= 1e-6, (mode, diffs)
    log = read_metrics(tmp_path / "runs" / "off")
    assert any(r["auxk/h"] > 0 for r in log) and max(r["dead_pct/h"] for r in log) > 0


def test_optimizers_match_torch():
    """sae_mlx.optim and sae_torch.optim: the same updates and state names, step by step."""
    torch = pytest.importorskip("torch")
    import mlx.nn as nn

    from sae_mlx.optim import make_optimizer as mlx_opt
    from sae_torch.optim import make_optimizer as torch_opt

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 5)).astype(np.float32)
    grads = [rng.normal(size=(6, 5)).astype(np.float32) * 10.0 ** -i for i in range(4)]
    for name in ("signum", "adam"):
        tm, mm = torch.nn.Linear(5, 6), nn.Linear(5, 6)
        with torch.no_grad():
            tm.weight.copy_(torch.from_numpy(w0))
            tm.bias.zero_()
        mm.weight, mm.bias = mx.array(w0), mx.zeros((6,))
        t_opt, m_opt = torch_opt(name, tm), mlx_opt(name, mm)
        assert set(t_opt.state_tensors()) == set(m_opt.state_tensors())
        for t, g in enumerate(grads, 1):
            tm.weight.grad, tm.bias.grad = torch.from_numpy(g), torch.ones(6)
            t_opt.step(0.01, t)
            m_opt.step({"weight": mx.array(g), "bias": mx.ones((6,))}, 0.01, t)
            np.testing.assert_allclose(np.array(mm.weight), tm.weight.detach().numpy(), rtol=0, atol=1e-7)
        for key, value in t_opt.state_tensors().items():
            np.testing.assert_allclose(np.array(m_opt.state_tensors()[key]), value.numpy(), rtol=1e-6, atol=1e-12)


# ---- activation sources ----------------------------------------------------------------------------------------

@needs_train_deps
def test_mlx_lm_runner_matches_torch_and_resumes_across_runners(tiny_model_dir, tiny_cfg, tmp_path):
    """The tiny Llama loaded by mlx-lm: the same hookpoint names and activations as the torch model (residual
    output and an MLP's input/output); a run started with the mlx-lm runner resumes with the torch runner
    (the same token chunks, so the same data fingerprint)."""
    pytest.importorskip("mlx_lm", reason="the mlx-lm model runner needs the optional package mlx-lm")
    import torch

    from sae_mlx import activations as ma
    from sae_torch import activations as ta

    # Both runners in float32, explicitly: the 1e-5 tolerances below are float32 ones (the runners' matmuls sum in
    # different orders, about 1e-6 relative). `dtype auto` would give mlx-lm a bfloat16 model on a Mac's GPU
    # (about 4e-3 relative rounding), which is a precision choice, not a runner difference.
    model, _ = ma.load_model(str(tiny_model_dir), mx.float32)
    tmodel, _ = ta.load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    hooks = ma.resolve_hookpoints(model, ["layers.1", "layers.2.mlp"])
    assert hooks == ta.resolve_hookpoints(tmodel, ["layers.1", "layers.2.mlp"])
    assert ma.resolve_hookpoints(model, []) == ta.resolve_hookpoints(tmodel, []) == ["layers.1"]
    assert ma.resolve_hookpoints(model, [], layers=[0, 2]) == ["layers.0", "layers.2"]
    tokens = np.random.default_rng(0).integers(0, 1000, size=(2, 16))
    for transcode in (False, True):
        with ta.capture(tmodel, hooks, transcode) as got_t:
            ta.run_forward(tmodel, torch.from_numpy(tokens))
        with ma.capture(model, hooks, transcode) as got_m:
            ma.run_forward(model, mx.array(tokens))
        for hook in hooks:
            for i in ((0, 1) if transcode else (1,)):
                ref = got_t[hook][i].numpy()
                np.testing.assert_allclose(np.array(got_m[hook][i]), ref, atol=1e-5 * np.abs(ref).max())
    assert type(model.model.layers[1]).__name__ == "TransformerBlock"  # the wrappers are gone again
    with pytest.raises(UserError, match=r"unknown hookpoint 'layers\.1\.mpl'.*did you mean layers\.1\.mlp"):
        ma.resolve_hookpoints(model, ["layers.1.mpl"])

    # later epochs come from the memo: the same bits as running the model again on a differently made-up batch
    chunks = np.random.default_rng(1).integers(0, 1000, size=(6, 16)).astype(np.int32)
    memo = ma.ModelActivationSource(model, hooks, chunks, 2, 0, True, [])
    fresh = ma.ModelActivationSource(model, hooks, chunks, 2, 0, True, [], memo_bytes=0)
    batches = memo.batches()
    served = [next(batches) for _ in range(6)][3:]  # epoch 1, from the memo
    assert len(memo.memo) == 6 and not fresh.memo
    for got, ref in zip(served, fresh.batches(start=3)):
        for hook in hooks:
            for i in (0, 1):
                assert np.array_equal(np.array(got[hook][i]), np.array(ref[hook][i])), hook

    # harvest with either runner: the same tokens and (to rounding) the same activations
    from sae_core.activation_cache import ActivationCache

    harvest_cfg = tiny_cfg(hookpoints=["layers.2.mlp"], sae=SparseCoderConfig(transcode=True), max_tokens=32 * 6,
                           dtype="float32")  # float32 tolerance below, as above
    for runner in ("mlx-lm", "torch"):
        with torch_threads(1):
            ma.harvest(tmp_path / runner, harvest_cfg, progress=False, model_runner=runner)
    m_batch, t_batch = (next(ActivationCache(tmp_path / r).batches(64, 0)) for r in ("mlx-lm", "torch"))
    for got, ref in zip(m_batch["layers.2.mlp"], t_batch["layers.2.mlp"]):
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())

    with torch_threads(1):
        train(tiny_cfg(run_name="a"), progress=False, plots=False, stop_after_steps=3, model_runner="mlx-lm")
        state = read_run_state(tmp_path / "runs" / "a")
        result = train(tiny_cfg(run_name="a"), resume=True, progress=False, plots=False, model_runner="torch")
        assert result["step"] == 12
        # the resumed run kept the language model's precision it started with, whatever the torch runner's default
        assert read_run_state(tmp_path / "runs" / "a")["data"]["model_dtype"] == state["data"]["model_dtype"]
        train(tiny_cfg(run_name="b"), progress=False, plots=False, stop_after_steps=3, model_runner="torch")
    fresh = read_run_state(tmp_path / "runs" / "b")["data"]
    assert {**fresh, "model_dtype": None} == {**state["data"], "model_dtype": None}  # the same token chunks


# Run with torch unimportable (sys.modules["torch"] = None: `import torch` raises, find_spec says "not installed"),
# which is what a Mac user with only mlx, mlx-lm (and its transformers) has.
WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None
from sae_core.config import SparseCoderConfig
from sae_core.train_config import TrainConfig
from sae_mlx.trainer import train
cfg = TrainConfig(**json.loads(sys.argv[1]), sae=SparseCoderConfig(k=8, expansion_factor=4))
result = train(cfg, progress=False, plots=False)
from sae_mlx.activations import model_path
builtin = str(model_path("builtin:smollm2"))  # the materialised built-in model, found without torch
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sae_torch") and sys.modules[m] is not None)
print(json.dumps({"step": result["step"], "fvu": result["coders"]["layers.1"]["fvu"], "loaded": loaded,
                  "builtin": builtin}))
"""


def test_mlx_trains_without_torch(tiny_model_dir, smollm2_path, tmp_path):
    """MLX and mlx-lm alone train a model end to end (the default runner falls back to mlx-lm when torch is not
    installed) and find the built-in model once it is materialised; nothing of torch or sae_torch is imported."""
    pytest.importorskip("mlx_lm", reason="the mlx-lm model runner needs the optional package mlx-lm")
    import json

    cfg = dict(model=str(tiny_model_dir), hookpoints=["layers.1"], ctx_len=32, batch_size=4, max_tokens=32 * 4 * 3,
               lr=1e-3, save_dir=str(tmp_path / "runs"), run_name="no-torch", log_every=1, device="cpu")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_MLX_MODEL_RUNNER": ""}
    done = subprocess.run([PYTHON, "-c", WITHOUT_TORCH, json.dumps(cfg)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["step"] == 3 and np.isfinite(out["fvu"]) and out["loaded"] == []
    assert out["builtin"] == str(smollm2_path)
    assert read_run_state(tmp_path / "runs" / "no-torch")["data"]["model_dtype"] == "float32"


@needs_train_deps
def test_harvest_then_train_from_cache_on_either_backend(tiny_cfg, tmp_path):
    """An activation cache (written here by the MLX harvest, torch model runner) trains both backends; resuming
    from the cache on MLX is exact."""
    from sae_core.activation_cache import ActivationCache
    from sae_mlx.activations import harvest
    from sae_torch.trainer import train as torch_train

    with torch_threads(1):
        manifest = harvest(tmp_path / "cache", tiny_cfg(hookpoints=[], layers=[0, 1, 2], max_tokens=32 * 40),
                           shard_tokens=500, progress=False, model_runner="torch")
    assert ActivationCache(tmp_path / "cache").hookpoints == ["layers.0", "layers.1", "layers.2"]
    assert manifest["total_tokens"] == 40 * 31  # BOS excluded
    opts = dict(activations=str(tmp_path / "cache"), hookpoints=["layers.2"], max_tokens=32 * 4 * 6)
    full = train(tiny_cfg(run_name="c1", **opts), progress=False, plots=False)
    assert full["step"] == 6 and full["tokens"] == 6 * 128
    train(tiny_cfg(run_name="c2", **opts), progress=False, plots=False, stop_after_steps=3)
    train(tiny_cfg(run_name="c2", **opts), resume=True, progress=False, plots=False)
    _assert_same(_state(tmp_path / "runs" / "c1", "layers.2"), _state(tmp_path / "runs" / "c2", "layers.2"))
    assert read_run_state(tmp_path / "runs" / "c1")["data"]["kind"] == "cache"
    with torch_threads(1):
        assert torch_train(tiny_cfg(run_name="t", **opts), progress=False, plots=False)["step"] == 6


# ---- outputs and bad input ---------------------------------------------------------------------------------------

def test_metrics_log_plots_and_keep_best(tmp_path):
    batches = [{"h": b} for b in make_batches(12, 96, 24, seed=6)]
    result = train(_array_cfg(tmp_path, "m", 12, log_every=2, save_every=4, keep_best=True), batches,
                   progress=False)
    run = tmp_path / "runs" / "m"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(2, 13, 2))
    for key in ("tokens", "lr", "tokens_per_s", "elapsed_s", "fvu/h", "auxk/h", "multi_topk_fvu/h", "dead_pct/h",
                "l0/h"):
        assert all(key in r for r in records), key
    assert records[-1]["tokens"] == result["tokens"] and records[-1]["fvu/h"] < records[0]["fvu/h"]
    import matplotlib.image

    for name in ("loss.png", "firing_h.png"):
        image = matplotlib.image.imread(run / "plots" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert (run / "best" / "h" / "sae.safetensors").is_file()
    assert read_run_state(run)["best_fvu"]["h"] > 0
    state = _state(run, "h")
    assert state["fire_count"].sum() > 0 and state["tokens_since_fired"].dtype == np.int64
    assert set(state) >= {"optimizer.encoder.weight.exp_avg", "optimizer.W_dec.exp_avg_sq",
                          "optimizer.b_dec.exp_avg", "optimizer.encoder.bias.exp_avg_sq"}


def test_b_dec_starts_at_the_mean_of_the_first_batch(tmp_path):
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32) + 5
    train(_array_cfg(tmp_path, "b", 1, 64, lr=1e-9, max_tokens=None), [{"h": x}], progress=False, plots=False)
    np.testing.assert_allclose(_state(tmp_path / "runs" / "b", "h")["b_dec"], x.mean(0), atol=1e-4)


def test_nan_in_handed_over_arrays(tmp_path):
    good = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    batches = [{"h": good}, {"h": good}, {"h": np.full_like(good, np.nan)}]
    with pytest.raises(UserError, match=r"non-finite activations \(NaN or Inf\) at step 2, hookpoint 'h'"):
        train(_array_cfg(tmp_path, "n", 3, 64, max_tokens=None), batches, progress=False, plots=False)


def test_transcode_flag_must_match_the_activations(tmp_path):
    x = np.ones((64, 16), np.float32)
    with pytest.raises(UserError, match="activations are for a transcoder but the config says transcode=False"):
        train(_array_cfg(tmp_path, "t", 1, 64), [{"h": (x, x.copy())}], progress=False, plots=False)
