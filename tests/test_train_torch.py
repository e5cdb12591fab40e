"""Training end to end, torch backend: a real SmolLM2 run, exact resume, crash safety, Ctrl-C, bad input errors.

Plumbing tests use a tiny random Llama (conftest.tiny_model_dir); the real-run test uses the built-in SmolLM2.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import PYTHON, REPO, start_cli, wait_for  # noqa: E402
from sae_core.config import SparseCoderConfig  # noqa: E402
from sae_core.errors import UserError  # noqa: E402
from sae_core.metrics import read_metrics  # noqa: E402
from sae_core.training_state import SAVING, read_run_state, write_run_state  # noqa: E402
from sae_torch import SparseCoder  # noqa: E402
from sae_torch.trainer import train  # noqa: E402


def _weights(run: Path, name: str = "layers.1") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**load_file(run / name / "sae.safetensors"), **load_file(run / name / "state.safetensors")}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# ---- exact resume --------------------------------------------------------------------------------------------

@pytest.fixture
def small_text(tmp_path):
    """About 1,100 tokens: 31 training chunks of 32, so a dozen steps of 2 x 4 sequences span 3 epochs."""
    import pydoc_data.topics

    path = tmp_path / "small.txt"
    path.write_text(pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["assignment"][:3500])
    return str(path)


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_resume_equals_uninterrupted_run_bitwise(tiny_cfg, tmp_path, optimizer, small_text):
    """Pause after 5 of 12 steps (between two saves), resume: every weight, optimizer moment and firing counter
    is bitwise equal to the uninterrupted run's. Uses grad/micro accumulation, AuxK with live dead latents, two
    hookpoints, and data seen over several epochs (later epochs reuse memoised activations; the resumed run
    recomputes them)."""
    opts = dict(optimizer=optimizer, grad_acc_steps=2, micro_acc_steps=2, dead_feature_threshold=64,
                dataset=small_text,
                hookpoints=["layers.1", "layers.2"], save_every=4, max_tokens=32 * 4 * 2 * 12,
                sae=SparseCoderConfig(k=8, expansion_factor=4, multi_topk=optimizer == "adam"))
    full = train(tiny_cfg(run_name="full", **opts), progress=False, plots=False)
    paused = train(tiny_cfg(run_name="paused", **opts), progress=False, plots=False, stop_after_steps=5)
    assert paused["interrupted"] and paused["step"] == 5
    resumed = train(tiny_cfg(run_name="paused", **opts), resume=True, progress=False, plots=False)
    assert resumed["step"] == full["step"] == 12 and resumed["tokens"] == full["tokens"]
    runs = tmp_path / "runs"
    for hook in ("layers.1", "layers.2"):
        _assert_same(_weights(runs / "full", hook), _weights(runs / "paused", hook))
    state = read_run_state(runs / "paused")
    assert state["step"] == 12 and state["batches"] == 24 and state["backend"] == "torch"
    # the metrics log reads as one run: the same steps, the same FVUs
    full_log, resumed_log = read_metrics(runs / "full"), read_metrics(runs / "paused")
    assert [r["step"] for r in full_log] == [r["step"] for r in resumed_log] == [2, 4, 6, 8, 10, 12]
    same = [r["fvu/layers.1"] for r in full_log if r["step"] != 6]  # step 6's window straddles the pause
    assert same == [r["fvu/layers.1"] for r in resumed_log if r["step"] != 6]
    # AuxK ran (dead latents existed) in this configuration
    assert any(r["auxk/layers.1"] > 0 for r in full_log)


def test_memoised_activations_equal_recomputed_ones(tiny_cfg, small_text):
    from sae_core.data import load_token_chunks
    from sae_torch.activations import ModelActivationSource, load_model

    model, tokenizer = load_model(tiny_cfg().model, torch.device("cpu"))
    chunks = load_token_chunks(small_text, "train", tokenizer, 32)
    source = ModelActivationSource(model, ["layers.1", "layers.2"], chunks, 4, 0, False, [tokenizer.bos_token_id])
    per_epoch = source.batches_per_epoch
    memoised = list(zip(range(3 * per_epoch), source.batches()))
    assert per_epoch * 4 < len(source.memo) <= len(chunks)  # each chunk stored once (epochs drop different tails)
    fresh = ModelActivationSource(model, ["layers.1", "layers.2"], chunks, 4, 0, False, [tokenizer.bos_token_id],
                                  memo_bytes=0)
    for (_, a), (_, b) in zip(memoised, zip(range(3 * per_epoch), fresh.batches())):
        for hook in a:
            assert torch.equal(a[hook][0], b[hook][0])
    assert not fresh.memo


def test_resume_rejects_changed_settings(tiny_cfg):
    train(tiny_cfg(), progress=False, plots=False, stop_after_steps=2)
    with pytest.raises(UserError, match="cannot resume with different settings.*batch_size"):
        train(tiny_cfg(batch_size=8), resume=True, progress=False, plots=False)
    with pytest.raises(UserError, match="already holds a checkpoint.*--resume"):
        train(tiny_cfg(), progress=False, plots=False)


# ---- crash safety ----------------------------------------------------------------------------------------------

def _tiny_args(tiny_model_dir, tmp_path, run_name, steps=12, extra=()):
    return ["--model", tiny_model_dir, "--hookpoints", "layers.1", "--ctx_len", 32, "--batch_size", 4,
            "--max_tokens", 32 * 4 * steps, "--lr", "1e-3", "--k", 8, "--expansion_factor", 4,
            "--save_dir", tmp_path / "runs", "--run_name", run_name, "--save_every", 2, "--log_every", 2,
            "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_inside_a_save_leaves_a_resumable_checkpoint(tiny_model_dir, tiny_cfg, tmp_path):
    """SIGKILL while the step-4 checkpoint is half written: the run folder loads as the complete step-2
    checkpoint, and resuming it reproduces the uninterrupted run bit for bit."""
    run = tmp_path / "runs" / "killed"
    proc = start_cli(["train", *_tiny_args(tiny_model_dir, tmp_path, "killed")],
                     {"SAE_DEBUG_SAVE_DELAY": "4:60:write"})
    wait_for(proc, "debug: pausing")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run / SAVING / "layers.1" / "sae.safetensors").exists()  # the interrupted write is visible
    state = read_run_state(run)  # recovers: discards .saving
    assert state["step"] == 2 and not (run / SAVING).exists()
    SparseCoder.load_from_disk(run / "layers.1")  # loads and validates
    resumed = train(tiny_cfg(run_name="killed", save_every=2), resume=True, progress=False, plots=False)
    assert resumed["step"] == 12
    train(tiny_cfg(run_name="clean", save_every=2), progress=False, plots=False)
    _assert_same(_weights(run), _weights(tmp_path / "runs" / "clean"))


def test_a_save_cut_short_while_moving_into_place_rolls_forward(tiny_cfg, tmp_path, monkeypatch):
    """A save that stops after its commit point (.saving renamed to .ready) but before every item has been moved
    into place (simulated by an exception at the first move): the next read finishes the move."""
    import sae_core.training_state as ts

    train(tiny_cfg(save_every=2, hookpoints=["layers.1", "layers.2"]), progress=False, plots=False,
          stop_after_steps=2)
    run = tmp_path / "runs" / "tiny"

    def crash(stage, step=None):
        if stage == "publish":
            raise KeyboardInterrupt
    monkeypatch.setattr(ts, "debug_pause", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(save_every=2, hookpoints=["layers.1", "layers.2"]), resume=True, progress=False,
              plots=False, stop_after_steps=4)
    monkeypatch.undo()
    assert (run / ".ready").is_dir()  # committed, not yet all moved into place
    state = read_run_state(run)
    assert state["step"] == 4 and not (run / ".ready").exists()
    for hook in ("layers.1", "layers.2"):
        SparseCoder.load_from_disk(run / hook)
        assert read_run_state(run)["coders"][hook]["num_latents"] == 128


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(tiny_model_dir, tmp_path):
    run = tmp_path / "runs" / "sigint"
    proc = start_cli(["train", *_tiny_args(tiny_model_dir, tmp_path, "sigint", steps=100000,
                                           extra=["--save_every", 1000, "--no-plots"])])
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, "".join(proc.lines)
        time.sleep(0.05)  # wait until a few steps have run
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    proc.wait(timeout=120)
    proc.reader.join(timeout=10)
    err = "".join(proc.lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "Interrupted" in out and "Resume with: sae train --resume" in out
    state = read_run_state(run)
    assert state["step"] >= 2
    SparseCoder.load_from_disk(run / "layers.1")


# ---- bad input -------------------------------------------------------------------------------------------------

def test_unknown_hookpoint_lists_near_matches(tiny_cfg):
    with pytest.raises(UserError, match=r"unknown hookpoint 'layers\.1\.mpl'.*did you mean layers\.1\.mlp"):
        train(tiny_cfg(hookpoints=["layers.1.mpl"]), progress=False, plots=False)
    with pytest.raises(UserError, match="out of range"):
        train(tiny_cfg(hookpoints=[], layers=[7]), progress=False, plots=False)


def test_missing_model_and_dataset(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match="model './no/such/model' not found"):
        train(tiny_cfg(model="./no/such/model"), progress=False, plots=False)
    with pytest.raises(UserError, match="model 'no-such-org/no-such-model' not found"):
        train(tiny_cfg(model="no-such-org/no-such-model"), progress=False, plots=False)
    with pytest.raises(UserError, match="dataset .*missing.txt.* not found"):
        train(tiny_cfg(dataset=str(tmp_path / "missing.txt")), progress=False, plots=False)


def test_nan_activations_stop_without_overwriting_the_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """A forward hook injects NaN into layers.1's output from the 4th batch on: the run stops with a message
    naming the step and hookpoint, and the step-2 checkpoint is left as it was."""
    import sae_torch.activations as runner_module  # the torch model runner loads the model

    real_load = runner_module.load_model
    calls = {"n": 0}

    def load_with_nan_hook(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)

        def inject(module, inputs, output):
            calls["n"] += 1
            if calls["n"] > 4:  # the first call measures widths; batches 0-2 stay clean
                return output.masked_fill(torch.ones_like(output, dtype=torch.bool), float("nan"))
        model.model.layers[1].register_forward_hook(inject)
        return model, tokenizer

    monkeypatch.setattr(runner_module, "load_model", load_with_nan_hook)
    with pytest.raises(UserError, match=r"non-finite activations \(NaN or Inf\) at step 3, hookpoint 'layers.1'.*"
                                        r"checkpoint of step 2 is kept"):
        train(tiny_cfg(save_every=2), progress=False, plots=False)
    state = read_run_state(tmp_path / "runs" / "tiny")
    assert state["step"] == 2
    assert torch.isfinite(_weights(tmp_path / "runs" / "tiny")["W_dec"]).all()


def test_resume_keeps_the_model_dtype_the_run_started_with(tiny_cfg, tmp_path):
    """`dtype auto` is bfloat16 on a GPU (CUDA, Metal/MPS) and float32 on a CPU, in both model runners: the resolved
    dtype is part of the run (state.json data.model_dtype), and a resume where auto resolves differently (another
    machine or runner) keeps the run's precision instead of mixing two. A run started on a GPU is stood in for by
    rewriting this CPU run's recorded dtype (here auto can only resolve to float32)."""
    run = tmp_path / "runs" / "tiny"
    train(tiny_cfg(), progress=False, plots=False, stop_after_steps=2)
    state = read_run_state(run)
    assert state["data"]["model_dtype"] == "float32"
    state["data"]["model_dtype"] = "bfloat16"
    write_run_state(run, state)
    result = train(tiny_cfg(), resume=True, progress=False, plots=False, stop_after_steps=4)
    assert result["step"] == 4
    assert read_run_state(run)["data"]["model_dtype"] == "bfloat16"  # what the runner reported it loaded


def test_nan_in_handed_over_arrays(tiny_cfg):
    good = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    batches = [{"h": good}, {"h": good}, {"h": np.full_like(good, np.nan)}]
    with pytest.raises(UserError, match="at step 2, hookpoint 'h'"):
        train(tiny_cfg(max_tokens=None, save_every=1000), batches, progress=False, plots=False)


@pytest.mark.slow
def test_out_of_memory_gives_a_fix(tiny_model_dir, tmp_path):
    """A real allocation failure: the process's address space is capped (RLIMIT_AS) at its size after start-up
    plus 1.5 GiB, and the batch needs a 2 GiB pre-activation matrix."""
    script = (
        "import resource, sys, torch, transformers\n"
        "from sae_core.cli import main\n"
        "torch.ones(8) @ torch.ones(8)\n"  # start the thread pool before the cap
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "limit = size + 1536 * 2**20\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "sys.exit(main(sys.argv[1:]))\n")
    args = _tiny_args(tiny_model_dir, tmp_path, "oom", steps=1, extra=["--num_latents", 32768, "--batch_size",
                                                                      512, "--max_tokens", 32 * 512])
    proc = subprocess.run([PYTHON, "-c", script, "train", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "out of memory" in lines[0] and "--batch_size" in lines[0]
    assert "--grad_acc_steps" in lines[0] and "--micro_acc_steps" in lines[0]
    assert "Traceback" not in proc.stderr


# ---- outputs -------------------------------------------------------------------------------------------------

def test_metrics_log_and_plots(tiny_cfg, tmp_path):
    result = train(tiny_cfg(keep_best=True, save_every=4), progress=False)
    run = tmp_path / "runs" / "tiny"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(2, 13, 2))
    for key in ("tokens", "lr", "tokens_per_s", "fvu/layers.1", "auxk/layers.1", "multi_topk_fvu/layers.1",
                "dead_pct/layers.1", "l0/layers.1"):
        assert all(key in r for r in records), key
    assert records[-1]["tokens"] == result["tokens"]
    import matplotlib.image

    for name in ("loss.png", "firing_layers.1.png"):
        image = matplotlib.image.imread(run / "plots" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert (run / "best" / "layers.1" / "sae.safetensors").is_file()
    assert read_run_state(run)["best_fvu"]["layers.1"] > 0
    state = _weights(run)
    assert state["fire_count"].sum() > 0 and state["tokens_since_fired"].dtype == torch.int64
    assert set(state) >= {"optimizer.encoder.weight.z", "optimizer.W_dec.y", "optimizer.b_dec.z",
                          "optimizer.encoder.bias.y", "optimizer.k", "optimizer.lr_max", "optimizer.weight_sum"}


def test_train_from_handed_over_arrays_and_transcoder(tiny_cfg, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 24)).astype(np.float32)
    batches = [(lambda x: {"mlp": (x, x @ w)})(rng.normal(size=(128, 16)).astype(np.float32)) for _ in range(30)]
    result = train(tiny_cfg(max_tokens=None, lr=3e-3, sae=SparseCoderConfig(k=8, num_latents=64, transcode=True)),
                   batches, progress=False, plots=False)
    assert result["step"] == 30
    sae = SparseCoder.load_from_disk(tmp_path / "runs" / "tiny" / "mlp")
    assert (sae.d_in, sae.d_out) == (16, 24) and sae.cfg.transcode
    records = read_metrics(tmp_path / "runs" / "tiny")
    assert records[-1]["fvu/mlp"] < records[0]["fvu/mlp"]


def test_several_init_seeds_train_one_coder_each(tiny_cfg, tmp_path):
    x = np.random.default_rng(3).normal(size=(64, 16)).astype(np.float32)
    result = train(tiny_cfg(max_tokens=None, init_seeds=[0, 1]), [{"h": x}] * 3, progress=False, plots=False)
    assert set(result["coders"]) == {"h/seed0", "h/seed1"}
    run = tmp_path / "runs" / "tiny"
    a, b = SparseCoder.load_from_disk(run / "h" / "seed0"), SparseCoder.load_from_disk(run / "h" / "seed1")
    assert not torch.equal(a.encoder.weight, b.encoder.weight)
    assert read_run_state(run)["coders"]["h/seed1"] == {"hookpoint": "h", "seed": 1, "d_in": 16, "d_out": 16,
                                                          "num_latents": 64}


def test_harvest_then_train_from_cache(tiny_cfg, tmp_path):
    from sae_core.activation_cache import ActivationCache
    from sae_torch.activations import harvest

    cfg = tiny_cfg(hookpoints=["layers.?"], max_tokens=32 * 40)  # fnmatch: "layers.*" would match sublayers too
    manifest = harvest(tmp_path / "cache", cfg, shard_tokens=500, progress=False)
    cache = ActivationCache(tmp_path / "cache")
    assert cache.hookpoints == ["layers.0", "layers.1", "layers.2"]
    assert manifest["total_tokens"] == 40 * 31  # BOS excluded
    assert len(manifest["shards"]) == 3
    with pytest.raises(UserError, match="no hookpoint matching 'layers.9'"):
        train(tiny_cfg(activations=str(tmp_path / "cache"), hookpoints=["layers.9"]), progress=False)
    opts = dict(activations=str(tmp_path / "cache"), hookpoints=["layers.2"], max_tokens=32 * 4 * 6)
    full = train(tiny_cfg(run_name="c1", **opts), progress=False, plots=False)
    assert full["step"] == 6 and full["tokens"] == 6 * 128
    train(tiny_cfg(run_name="c2", **opts), progress=False, plots=False, stop_after_steps=3)
    train(tiny_cfg(run_name="c2", **opts), resume=True, progress=False, plots=False)
    _assert_same(_weights(tmp_path / "runs" / "c1", "layers.2"), _weights(tmp_path / "runs" / "c2", "layers.2"))
    assert read_run_state(tmp_path / "runs" / "c1")["data"]["kind"] == "cache"


def test_a_checkpoint_from_before_average_power_and_auxk_raise_only_resumes_as_it_trained():
    from sae_core.train_config import TrainConfig
    from sae_core.training_state import merge_resume_config

    old = TrainConfig().to_dict()
    del old["average_power"], old["auxk_raise_only"]  # written before the settings existed: r = 0, exact AuxK
    resumed = merge_resume_config({"train_config": old}, TrainConfig(), explicit=set())
    assert resumed.average_power == 0.0 and resumed.auxk_raise_only is False
    assert merge_resume_config({"train_config": old}, TrainConfig(), explicit={"max_tokens"}).average_power == 0.0
    with pytest.raises(UserError, match="average_power: checkpoint has 0.0, asked for 2.0"):
        merge_resume_config({"train_config": old}, TrainConfig(), explicit=None)
    current = TrainConfig().to_dict()
    assert merge_resume_config({"train_config": current}, TrainConfig(), explicit=set()).average_power == 2.0


def test_lr_defaults_and_schedule():
    from sae_core.train_config import TrainConfig

    cfg = TrainConfig()
    assert cfg.default_lr(2**14, 65536) == pytest.approx(5e-3)  # sparsify's step: SPEC's values
    assert cfg.default_lr(4 * 2**14, 65536) == pytest.approx(2.5e-3)
    assert cfg.default_lr(2**14, 1024) == pytest.approx(1.25e-3)  # scaled by 1024 / 4096 = 1/4
    assert cfg.default_lr(2**14, 256) == cfg.default_lr(2**14, 1) == pytest.approx(1.25e-3)  # and never by less
    assert cfg.default_lr(2**14, 2048) == pytest.approx(2.5e-3)  # half
    assert cfg.default_lr(2**14, 4096) == pytest.approx(5e-3)  # 4096 and up: sparsify's
    with pytest.raises(UserError, match="average_power"):
        TrainConfig(average_power=-1).validate()
    adam = TrainConfig(optimizer="adam")
    assert adam.default_lr(2**14, 1024) == adam.default_lr(2**14, 65536) == pytest.approx(2e-4)
    assert adam.warmup_steps(50_000) == 1000 and adam.warmup_steps(300) == 30 and cfg.warmup_steps(300) == 0
    assert TrainConfig(optimizer="adam", lr_warmup_steps=7).warmup_steps(300) == 7
    lrs = [adam.lr_at(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert TrainConfig(optimizer="adam", lr_decay=False).lr_at(100, 1.0, 0, 110) == 1.0
    assert TrainConfig().lr_at(100, 1.0, 0, 110) == 1.0  # signum (schedule-free): constant by default, as sparsify
    assert TrainConfig(lr_decay=True).lr_at(100, 1.0, 0, 110) == pytest.approx(10 / 110)


def test_adam_matches_torch_adam():
    """(Schedule-free signum is checked against the schedulefree package in tests/test_optim_schedulefree.py.)"""
    from sae_torch.optim import Adam

    torch.manual_seed(0)
    p0 = torch.randn(5)
    grads = [torch.randn(5) for _ in range(3)]
    q = torch.nn.Parameter(p0.clone())
    ref = torch.nn.Parameter(p0.clone())
    ours, theirs = Adam({"w": q}), torch.optim.Adam([ref], lr=0.01)
    for t, g in enumerate(grads, 1):
        q.grad, ref.grad = g.clone(), g.clone()
        ours.step(0.01, t)
        theirs.step()
    assert torch.allclose(q.detach(), ref.detach(), atol=1e-6)
    assert set(ours.state_tensors()) == {"optimizer.w.exp_avg", "optimizer.w.exp_avg_sq"}


def test_default_signum_lr_follows_the_tokens_each_step_really_takes(tiny_cfg, tmp_path):
    """Arrays (or a cache) set the step size, not batch_size * ctx_len: 2048-token arrays with grad_acc_steps 2 are
    4096-token steps, which take sparsify's lr unscaled (the config's own 4 x 32 tokens would scale it by 1/32)."""
    from sae_core.train_config import TrainConfig

    x = np.random.default_rng(1).normal(size=(2048, 16)).astype(np.float32)
    for acc, tokens in ((1, 2048), (2, 4096)):
        name = f"acc{acc}"
        train(tiny_cfg(run_name=name, lr=None, max_tokens=None, grad_acc_steps=acc, log_every=1), [{"h": x}] * 2,
              progress=False, plots=False)
        lrs = {r["lr"] for r in read_metrics(tmp_path / "runs" / name)}
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(TrainConfig().default_lr(64, tokens)), (acc, lrs)
    assert TrainConfig().default_lr(64, 4096) == pytest.approx(5e-3 * 16)


def test_default_dead_threshold_is_a_tenth_of_the_run_and_survives_a_longer_resume(tiny_cfg, tmp_path):
    from sae_core.train_config import TrainConfig

    assert TrainConfig().dead_threshold(300_000) == 30_000
    assert TrainConfig().dead_threshold(10**9) == TrainConfig().dead_threshold(None) == 10_000_000
    assert TrainConfig().dead_threshold(5) == 1 and TrainConfig(dead_feature_threshold=7).dead_threshold(10**6) == 7
    x = np.random.default_rng(2).normal(size=(256, 16)).astype(np.float32)
    batches = [{"h": x * (1 + i % 3)} for i in range(40)]
    run = tmp_path / "runs" / "tenth"
    sae = SparseCoderConfig(k=2, expansion_factor=16)  # 256 latents, 512 firings per batch: some go silent
    train(tiny_cfg(run_name="tenth", sae=sae, max_tokens=256 * 20, log_every=1), batches, progress=False, plots=False)
    assert read_run_state(run)["dead_threshold"] == 512
    assert any(r["auxk/h"] > 0 for r in read_metrics(run))  # latents died within 512 tokens and AuxK trained them
    train(tiny_cfg(run_name="tenth", sae=sae, max_tokens=256 * 40, log_every=1), batches, resume=True,
          progress=False, plots=False)
    state = read_run_state(run)
    assert state["step"] == 40 and state["dead_threshold"] == 512  # not a tenth of the longer run


def test_micro_acc_steps_do_not_change_the_gradient(tiny_cfg, tmp_path):
    """Chunking a batch renormalises each chunk by the whole batch's variance: same update up to rounding."""
    x = np.random.default_rng(1).normal(size=(96, 16)).astype(np.float32) * 3 + 1
    batches = [{"h": x}] * 3
    train(tiny_cfg(run_name="one", max_tokens=None, optimizer="adam"), batches, progress=False, plots=False)
    train(tiny_cfg(run_name="three", max_tokens=None, optimizer="adam", micro_acc_steps=3), batches,
          progress=False, plots=False)
    a, b = _weights(tmp_path / "runs" / "one", "h"), _weights(tmp_path / "runs" / "three", "h")
    for key in ("encoder.weight", "W_dec", "b_dec"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_b_dec_starts_at_the_mean_of_the_first_batch(tiny_cfg, tmp_path):
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32) + 5
    train(tiny_cfg(max_tokens=None, lr=1e-9), [{"h": x}], progress=False, plots=False)
    b_dec = _weights(tmp_path / "runs" / "tiny", "h")["b_dec"]
    assert torch.allclose(b_dec, torch.from_numpy(x.mean(0)), atol=1e-4)

