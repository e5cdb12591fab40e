"""Distributed training, MLX (ring backend over TCP on 127.0.0.1, 2 real processes): data parallel == 1 rank on
the same global batches, resume at another world size, a dying rank stops the others (watchdog).

Tiny coders trained from arrays (made in NumPy from a seed). This file is also the worker:
`python tests/test_distributed_mlx.py worker <json options>`; ranks are started with MLX_RANK and MLX_HOSTFILE
(what mlx.launch sets); one test goes through mlx.launch itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import distributed_runs
from distributed_runs import BATCHES, REPO, ROWS, free_port, max_rel_diff, results, tensors, wait

HOOKS = ("layers.0", "layers.1")


def make_batches(seed: int = 0, hooks=HOOKS, rows=ROWS, batches=BATCHES):
    return distributed_runs.make_batches(hooks, seed, rows, batches)


def write_cache(folder: Path, hooks=HOOKS, tokens: int = 4 * ROWS) -> Path:
    return distributed_runs.write_cache(folder, hooks, tokens)


def start(opts: dict, world: int, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Start `world` ranks with MLX_RANK and a ring hostfile of free ports, as mlx.launch would."""
    hostfile = Path(opts["save_dir"]) / f"hosts-{free_port()}.json"
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text(json.dumps([f"127.0.0.1:{free_port()}" for _ in range(world)]))
    return distributed_runs.start(__file__, opts, world, lambda rank: dict(MLX_RANK=str(rank),
                                                                           MLX_HOSTFILE=str(hostfile)), extra_env)


def launch(opts: dict, world: int, timeout: float = 120, extra_env: dict | None = None):
    return wait(start(opts, world, extra_env), timeout)


def launch_many(jobs: dict[str, tuple[dict, int]], timeout: float = 180) -> dict[str, list]:
    """Several independent runs at once (process start-up, mostly imports and MLX's compile, dominates their time)."""
    started = {name: start(opts, world) for name, (opts, world) in jobs.items()}
    return {name: wait(procs, timeout) for name, procs in started.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

pytest.importorskip("mlx.core")
COMMON = dict(hooks=list(HOOKS), optimizer="adam", grad_acc=2, micro_acc=2, steps=8, multi_topk=True)
# Measured here, 2 ranks vs 1 rank, Adam: max |diff| / max |ref| over the weights 7.6e-5 (b_dec of one coder;
# the others <= 5e-6): Adam divides by sqrt(v), and b_dec's gradient starts near 0 (b_dec is initialised to the
# batch mean), so float-summation differences are amplified there. Firing counters are equal.
ADAM_RTOL = 5e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the tests compare, started together: 1 rank (no group: the plain trainer), 2 ranks (full, and
    paused after 2 of 4 steps), and signum at 1 and 2 ranks."""
    d = tmp_path_factory.mktemp("dist_mlx")
    common = {**COMMON, "save_dir": str(d)}
    signum = {**common, "optimizer": "signum", "multi_topk": False}
    done = launch_many({"one": ({**common, "run_name": "one"}, 1),
                        "two": ({**common, "run_name": "two"}, 2),
                        "resized": ({**common, "run_name": "resized", "stop_after": 2}, 2),
                        "signum_one": ({**signum, "run_name": "signum_one"}, 1),
                        "signum_two": ({**signum, "run_name": "signum_two"}, 2)})
    return d, {name: results(procs) for name, procs in done.items()}


def _assert_close_to_reference(run: Path, ref_run: Path, rtol: float) -> None:
    for hook in HOOKS:
        a, b = tensors(ref_run, hook), tensors(run, hook)
        assert a.keys() == b.keys()
        assert max_rel_diff(a, b) <= rtol, (hook, max_rel_diff(a, b))
        for key in ("tokens_since_fired", "fire_count"):  # dead-latent statistics: reduced across ranks, exact
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{hook} {key}")
        assert (a["tokens_since_fired"] >= 200).any(), "the run should have had dead latents (AuxK active)"


def test_data_parallel_two_ranks_equals_one_rank(runs):
    """2 ring ranks, each with half of every global batch (grad and micro accumulation, AuxK with dead latents,
    Multi-TopK): weights and firing counters match the 1-rank run; one checkpoint, written by rank 0."""
    from sae_core.training_state import read_run_state

    save_dir, res = runs
    ref, two = res["one"][0], res["two"]
    assert [r["rank"] for r in two] == [0, 1]
    for r in two:
        assert r["step"] == ref["step"] == 4 and r["tokens"] == ref["tokens"] == ROWS * 8
        for hook in HOOKS:  # logged metrics are global
            assert abs(r["coders"][hook]["fvu"] - ref["coders"][hook]["fvu"]) <= 1e-4
    _assert_close_to_reference(save_dir / "two", save_dir / "one", ADAM_RTOL)
    state = read_run_state(save_dir / "two")
    assert state["step"] == 4 and state["batches"] == 8 and state["tokens"] == ROWS * 8 and state["backend"] == "mlx"


def test_resume_at_a_different_world_size(runs):
    """Save at 2 ranks after 2 of 4 steps, resume at 1 rank: the result is the uninterrupted 1-rank run's."""
    save_dir, res = runs
    ref, paused = res["one"][0], res["resized"]
    assert paused[0]["step"] == 2
    (resumed,) = results(launch({**COMMON, "save_dir": str(save_dir), "run_name": "resized", "resume": True}, 1))
    assert resumed["step"] == 4 and resumed["tokens"] == ref["tokens"]
    _assert_close_to_reference(save_dir / "resized", save_dir / "one", ADAM_RTOL)


def test_signum_data_parallel_within_sign_flip_tolerance(runs):
    """signum moves every weight by exactly lr per step in the direction of sign(momentum); a rounding
    difference in a momentum entry near 0 flips it (a 2 lr difference, and possibly a latent that fires
    differently afterwards). Measured here: flips in one coder's b_dec and a few W_dec/encoder entries
    (max |diff| 6e-3 = 2 lr), none in the other coder. Allowed: at most 5% of entries off by more than 1e-5,
    none by more than 2 * lr * steps; the FVU within 1e-3."""
    save_dir, res = runs
    lr, steps = 3e-3, 4
    for hook in HOOKS:
        a, b = tensors(save_dir / "signum_one", hook), tensors(save_dir / "signum_two", hook)
        for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
            diff = np.abs(a[key] - b[key])
            assert (diff > 1e-5).mean() <= 0.05 and diff.max() <= 2 * lr * steps + 1e-5, (hook, key)
        fvu1, fvu2 = res["signum_one"][0]["coders"][hook]["fvu"], res["signum_two"][0]["coders"][hook]["fvu"]
        assert abs(fvu1 - fvu2) <= 1e-3


def test_a_dying_or_stuck_rank_stops_the_others_with_a_clear_error(tmp_path):
    """Rank 1 exits at step 2: the ring reports the lost peer and rank 0 stops with an error naming the
    collective. Rank 1 hangs at step 2 instead: rank 0's watchdog ends it after SAE_DIST_TIMEOUT (5 s)."""
    started = {mode: start({"save_dir": str(tmp_path), "run_name": mode, "steps": 8}, 2,
                           extra_env={"SAE_DEBUG_DIE": "1:2" + (":hang" if mode == "hang" else ""),
                                      "SAE_DIST_TIMEOUT": "5"}) for mode in ("die", "hang")}
    t0 = time.monotonic()
    die = wait(started["die"], timeout=60)
    assert die[1].returncode == 1 and "dying at step 2" in die[1].stderr
    assert die[0].returncode != 0
    assert "rank 0: lost the other ranks during" in die[0].stderr, die[0].stderr[-2000:]
    rank0 = started["hang"][0]
    out, err = rank0.communicate(timeout=max(60 - (time.monotonic() - t0), 1))
    started["hang"][1].kill()
    started["hang"][1].communicate()
    assert rank0.returncode == 1 and "got no answer from the other ranks in 5 s" in err, err[-2000:]


def test_mlx_launch_cli(tmp_path):
    """The real launcher: `mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- python -m sae_mlx train ...`
    from an activation cache; one checkpoint, by rank 0, at the global step count."""
    from sae_core.training_state import read_run_state

    cache = write_cache(tmp_path / "cache")
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port",
           str(free_port()), "--", sys.executable, "-m", "sae_mlx", "train", "--activations", str(cache),
           "--batch_size", "2", "--ctx_len", "48", "--max_tokens", str(4 * ROWS), "--k", "4", "--expansion_factor",
           "4", "--save_dir", str(tmp_path / "runs"), "--run_name", "cli", "--quiet", "--no-lr_decay"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_DIST_TIMEOUT": "60"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    state = read_run_state(tmp_path / "runs" / "cli")
    assert sorted(state["coders"]) == list(HOOKS) and state["step"] == 4 and state["tokens"] == 4 * ROWS


def test_launches_of_every_mlx_backend_are_recognised(tmp_path):
    """What mlx.launch (MLX 0.32, mlx/_distributed_utils/launch.py) hands each process, per backend: all set
    MLX_RANK; ring adds MLX_HOSTFILE (a file: JSON list, one entry per rank, empty for one process), jaccl
    MLX_JACCL_COORDINATOR and MLX_IBV_DEVICES (a file: one row of RDMA devices per rank), nccl MLX_WORLD_SIZE."""
    from sae_mlx.distributed import launched_by_mlx, launched_world_size

    ring, single, devices = tmp_path / "ring.json", tmp_path / "single", tmp_path / "ibv.json"
    ring.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"]]))
    single.write_text("")
    devices.write_text(json.dumps([[None, "rdma_en2"], ["rdma_en2", None]]))
    launches = {
        "ring": ({"MLX_RANK": "1", "MLX_HOSTFILE": str(ring)}, 2),
        "ring, one host": ({"MLX_RANK": "0", "MLX_HOSTFILE": str(single)}, 1),
        "jaccl": ({"MLX_RANK": "0", "MLX_JACCL_COORDINATOR": "10.0.0.1:32323", "MLX_IBV_DEVICES": str(devices)}, 2),
        "nccl": ({"MLX_RANK": "0", "MLX_WORLD_SIZE": "4", "NCCL_HOST_IP": "10.0.0.1"}, 4),
        "mpi": ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
    }
    for name, (env, world) in launches.items():
        assert launched_by_mlx(env) == (world > 1 or "MLX_RANK" in env), name
        assert launched_world_size(env) == world, name
    assert not launched_by_mlx({}) and not launched_by_mlx({"MLX_RANK": "0"})  # a stray MLX_RANK alone is no launch


def test_a_jaccl_launch_whose_group_cannot_form_stops_every_rank(tmp_path):
    """The real launcher with `--backend jaccl` (two local processes, RDMA devices named as on a Mac): MLX cannot
    form the JACCL group here (no RDMA on Linux) and gives each process a group of one; a rank must stop with one
    clear error instead of training alone into the shared run folder (the launcher then ends the others)."""
    cache = write_cache(tmp_path / "cache")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "jaccl", "hosts": [
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": [None, "rdma_en2"]},
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": ["rdma_en2", None]}]}))
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "--hostfile", str(hostfile), "--starting-port", str(free_port()), "--", sys.executable,
           "-m", "sae_mlx", "train", "--activations", str(cache), "--batch_size", "2", "--ctx_len", "48",
           "--max_tokens", str(4 * ROWS), "--k", "4", "--expansion_factor", "4", "--save_dir", str(tmp_path / "runs"),
           "--run_name", "jaccl", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors and "exited with code 2" in p.stderr, p.stderr[-3000:]  # (mlx.launch itself exits 0)
    assert all("mlx.launch started 2 processes (jaccl), but MLX joined a group of 1" in e for e in errors), errors
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs" / "jaccl").exists()  # nobody trained


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    sys.path.insert(0, str(REPO))
    from sae_mlx import distributed

    distributed_runs.worker(json.loads(sys.argv[2]), distributed, HOOKS)
    sys.exit(0)
