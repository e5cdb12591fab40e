"""Distributed training, torch (gloo on 127.0.0.1, 2 real processes): data parallel == 1 rank on the same global
batches, distribute_modules trains every coder once, resume at another world size, a dying rank stops the others.

Tiny coders trained from arrays (made in NumPy from a seed), so each multi-process run costs a few seconds, mostly
process start-up. This file is also the worker: `python tests/test_distributed_torch.py worker <json options>`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distributed_runs
from distributed_runs import BATCHES, REPO, ROWS, free_port, max_rel_diff, results, tensors, wait

HOOKS = ("layers.0", "layers.1", "layers.2")


def make_batches(seed: int = 0, hooks=HOOKS, rows=ROWS, batches=BATCHES):
    return distributed_runs.make_batches(hooks, seed, rows, batches)


def write_cache(folder: Path, hooks=HOOKS, tokens: int = 4 * ROWS) -> Path:
    return distributed_runs.write_cache(folder, hooks, tokens)


def start(opts: dict, world: int, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Start `world` ranks on a free port, as torchrun would."""
    port = free_port()
    return distributed_runs.start(__file__, opts, world, lambda rank: dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world)), extra_env)


def launch(opts: dict, world: int, timeout: float = 120, extra_env: dict | None = None):
    return wait(start(opts, world, extra_env), timeout)


def launch_many(jobs: dict[str, tuple], timeout: float = 180) -> dict[str, list]:
    """Several independent runs at once, {name: (opts, world[, extra_env])} (process start-up, mostly importing
    torch, dominates their time)."""
    started = {name: start(*job) for name, job in jobs.items()}
    return {name: wait(procs, timeout) for name, procs in started.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

pytest.importorskip("torch")
COMMON = dict(hooks=list(HOOKS), optimizer="adam", grad_acc=2, micro_acc=2, steps=8, multi_topk=True)
# Measured here: 2-rank vs 1-rank data parallel, Adam, max |diff| / max |ref| over the weights <= 2.5e-7
# (float summation order); firing counters equal. The tolerance leaves 40x room.
ADAM_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All the runs the tests look at, started together: the 1-rank reference (no process group: the plain
    trainer on the global batches), 2-rank data parallel (full, and paused after 2 of 4 steps), 2-rank
    distribute_modules, signum at 1 and 2 ranks, and a 2-rank run whose rank 1 dies at step 2."""
    d = tmp_path_factory.mktemp("dist_torch")
    common = {**COMMON, "save_dir": str(d)}
    signum = {**common, "optimizer": "signum", "multi_topk": False, "hooks": ["layers.0"]}
    done = launch_many({"one": ({**common, "run_name": "one"}, 1),
                        "two": ({**common, "run_name": "two"}, 2),
                        "resized": ({**common, "run_name": "resized", "stop_after": 2}, 2),
                        "modules": ({**common, "run_name": "modules", "distribute_modules": True}, 2),
                        "signum_one": ({**signum, "run_name": "signum_one"}, 1),
                        "signum_two": ({**signum, "run_name": "signum_two"}, 2),
                        "die": ({**common, "run_name": "die"}, 2, {"SAE_DEBUG_DIE": "1:2", "SAE_DIST_TIMEOUT": "20"})})
    die = done.pop("die")
    return d, {name: results(procs) for name, procs in done.items()} | {"die": die}


def _assert_close_to_reference(run: Path, ref_run: Path, rtol: float) -> None:
    for hook in HOOKS:
        a, b = tensors(ref_run, hook), tensors(run, hook)
        assert a.keys() == b.keys()
        assert max_rel_diff(a, b) <= rtol, (hook, max_rel_diff(a, b))
        for key in ("tokens_since_fired", "fire_count"):  # dead-latent statistics: reduced across ranks, exact
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{hook} {key}")
        assert (a["tokens_since_fired"] >= 200).any(), "the run should have had dead latents (AuxK active)"


def test_data_parallel_two_ranks_equals_one_rank(runs):
    """2 gloo ranks, each with half of every global batch (grad and micro accumulation, AuxK with dead latents,
    Multi-TopK): the weights, Adam moments and firing counters match the 1-rank run; one checkpoint, by rank 0."""
    from sae_core.training_state import read_run_state

    save_dir, res = runs
    ref, two = res["one"][0], res["two"]
    assert [r["rank"] for r in two] == [0, 1]
    for r in two:
        assert r["step"] == ref["step"] == 4 and r["tokens"] == ref["tokens"] == ROWS * 8
        for hook in HOOKS:  # logged metrics are global
            assert abs(r["coders"][hook]["fvu"] - ref["coders"][hook]["fvu"]) <= 1e-5
    _assert_close_to_reference(save_dir / "two", save_dir / "one", ADAM_RTOL)
    for hook in HOOKS:  # Adam moments too
        a, b = tensors(save_dir / "one", hook), tensors(save_dir / "two", hook)
        for key in a:
            if key.startswith("optimizer."):
                assert np.abs(a[key] - b[key]).max() <= ADAM_RTOL * max(np.abs(a[key]).max(), 1e-12), key
    state = read_run_state(save_dir / "two")
    assert state["step"] == 4 and state["batches"] == 8 and state["tokens"] == ROWS * 8
    assert not list(save_dir.glob("two/.*")), "no staging folder left behind"


def test_resume_at_a_different_world_size(runs):
    """Save at 2 ranks after 2 of 4 steps, resume at 1 rank: the result is the uninterrupted 1-rank run's."""
    save_dir, res = runs
    ref, paused = res["one"][0], res["resized"]
    assert paused[0]["step"] == 2
    (resumed,) = results(launch({**COMMON, "save_dir": str(save_dir), "run_name": "resized", "resume": True}, 1))
    assert resumed["step"] == 4 and resumed["tokens"] == ref["tokens"]
    _assert_close_to_reference(save_dir / "resized", save_dir / "one", ADAM_RTOL)


def test_distribute_modules_trains_every_hookpoint_once(runs):
    """3 hookpoints on 2 ranks (rank 0: layers.0 and layers.1, rank 1: layers.2): each coder is trained by its
    owner alone on the full batches, so it equals the 1-rank run's (bit for bit here: same math, same order);
    a coder trained twice, or not at all, would not. One checkpoint holds all three."""
    from sae_core.loop import owners
    from sae_core.metrics import read_metrics
    from sae_core.training_state import read_run_state

    assert owners({h: h for h in HOOKS}, 2) == {"layers.0": 0, "layers.1": 0, "layers.2": 1}
    save_dir, res = runs
    ref, two = res["one"][0], res["modules"]
    for r in two:
        assert sorted(r["coders"]) == list(HOOKS) and r["tokens"] == ref["tokens"]
    _assert_close_to_reference(save_dir / "modules", save_dir / "one", 1e-6)
    state = read_run_state(save_dir / "modules")
    assert sorted(state["coders"]) == list(HOOKS) and state["step"] == 4
    records = read_metrics(save_dir / "modules")
    assert [r["step"] for r in records] == [2, 4] and all(f"fvu/{h}" in r for r in records for h in HOOKS)


def test_signum_data_parallel_within_sign_flip_tolerance(runs):
    """signum's update is lr * sign(momentum): a float-rounding difference in a momentum entry near 0 can flip
    a sign and move that weight by 2 lr. Measured here: no flips (max |diff| 1.2e-7); the test allows flips in
    at most 1% of the entries, each within 2 * lr * steps."""
    save_dir, _ = runs
    a, b = tensors(save_dir / "signum_one", "layers.0"), tensors(save_dir / "signum_two", "layers.0")
    lr, steps = 3e-3, 4
    for key in ("encoder.weight", "encoder.bias", "W_dec"):
        diff = np.abs(a[key] - b[key])
        assert (diff > 1e-5).mean() <= 0.01 and diff.max() <= 2 * lr * steps + 1e-5, key


def test_a_dying_rank_stops_the_others_with_a_clear_error(runs):
    """Rank 1 exits at step 2; rank 0 fails at its next collective (gloo sees the closed connection at once;
    init_process_group's timeout, 20 s here, bounds a silent hang) with an error naming the collective."""
    _, res = runs
    done = res["die"]
    assert done[1].returncode == 1 and "dying at step 2" in done[1].stderr
    assert done[0].returncode != 0
    assert "rank 0: lost the other ranks during" in done[0].stderr, done[0].stderr[-2000:]


def test_torchrun_cli_distribute_modules(tmp_path):
    """The real launcher: `torchrun --standalone --nproc_per_node=2 -m sae_torch train ...` from an
    activation cache, one hookpoint per rank; one summary, one checkpoint holding both coders."""
    from sae_core.training_state import read_run_state

    cache = write_cache(tmp_path / "cache", hooks=HOOKS[:2])
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "sae_torch", "train",
           "--activations", str(cache), "--batch_size", "2", "--ctx_len", "48", "--max_tokens", str(4 * ROWS),
           "--k", "4", "--expansion_factor", "4", "--save_dir", str(tmp_path / "runs"), "--run_name", "cli",
           "--distribute_modules", "--quiet", "--no-lr_decay"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SAE_DIST_TIMEOUT": "60"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    state = read_run_state(tmp_path / "runs" / "cli")
    assert sorted(state["coders"]) == list(HOOKS[:2]) and state["step"] == 4
    assert state["train_config"]["distribute_modules"] is True


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    sys.path.insert(0, str(REPO))
    from sae_torch import distributed

    distributed_runs.worker(json.loads(sys.argv[2]), distributed, HOOKS)
    sys.exit(0)
