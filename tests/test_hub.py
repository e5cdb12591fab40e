"""Published coders by Hugging Face Hub name: SparseCoder.load_from_hub / load_many and hub names in the CLI.

No network here, so every test reads a real huggingface_hub cache, laid out in a temporary folder the way
huggingface_hub writes one (models--org--name/{blobs, snapshots/<commit>, refs/<revision>}, snapshot files as
relative symlinks to content-addressed blobs) and checked by huggingface_hub itself (scan_cache_dir,
try_to_load_from_cache) before use, with HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1: the user's own offline
path through huggingface_hub, unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.fixtures import make_params
from sae_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint_numpy, save_checkpoint_numpy
from sae_core.config import SparseCoderConfig
from sae_core.hub import HubError

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache  # noqa: E402

REPO = "sae-twins-test/sae-smol-8x"
REPO_ROOT = Path(__file__).resolve().parents[1]
HOOKPOINTS = ("layers.0", "layers.1", "layers.2", "layers.10.mlp")
RUN_CONFIG = {"model": "HuggingFaceTB/SmolLM2-135M", "dataset": "EleutherAI/fineweb-edu-dedup-10b", "ctx_len": 512}


def coder_files(folder: Path, seed: int, transcode: bool = False) -> dict[str, bytes]:
    """A sparsify-layout coder written by our NumPy writer; {relative path: bytes}."""
    rng = np.random.default_rng(seed)
    cfg = SparseCoderConfig(num_latents=48, k=4, transcode=transcode, skip_connection=transcode)
    d_in, d_out = 12, 12
    save_checkpoint_numpy(folder, cfg, d_in, d_out, make_params(cfg, d_in, d_out, rng))
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def repo_files(tmp_path: Path, seed: int = 0) -> dict[str, bytes]:
    """What a sparsify run pushed to the Hub holds: a folder per hookpoint and the run's config.json."""
    files = {"config.json": json.dumps(RUN_CONFIG).encode()}
    for i, hookpoint in enumerate(HOOKPOINTS):
        for name, data in coder_files(tmp_path / f"src{seed}" / hookpoint, seed * 10 + i,
                                      transcode=hookpoint.endswith(".mlp")).items():
            files[f"{hookpoint}/{name}"] = data
    return files


def add_commit(cache: Path, repo_id: str, files: dict[str, bytes], refs=("main",)) -> str:
    """Add one commit of `repo_id` to a huggingface_hub cache as huggingface_hub lays it out; returns its hash."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for path, data in files.items():
        # the blob's name is the file's etag: the sha256 of an LFS file, the git blob sha1 of a small one
        lfs = path.endswith(".safetensors")
        blob_id = (hashlib.sha256(data).hexdigest() if lfs
                   else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        blob = storage / "blobs" / blob_id
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache holding REPO (main = the newest of two commits, tag v1 = the older)."""
    cache = tmp_path / "hf-cache"
    old = add_commit(cache, REPO, repo_files(tmp_path, seed=1), refs=("v1",))
    new = add_commit(cache, REPO, repo_files(tmp_path, seed=0))
    # huggingface_hub reads these variables once, at import (which another test may have done already)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {"cache": cache, "main": new, "v1": old, "src": tmp_path / "src0", "src_v1": tmp_path / "src1"}


def test_cache_layout_is_huggingface_hubs_own(hub_cache):
    """huggingface_hub itself reads the hand-made cache: no corrupted entries, both commits, files resolved."""
    info = scan_cache_dir(hub_cache["cache"])
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert {r.commit_hash for r in repo.revisions} == {hub_cache["main"], hub_cache["v1"]}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v1"}
    path = try_to_load_from_cache(REPO, f"layers.1/{WEIGHTS_FILE}", cache_dir=hub_cache["cache"])
    assert Path(path) == hub_cache["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub_cache[
        "main"] / "layers.1" / WEIGHTS_FILE
    assert Path(path).read_bytes() == (hub_cache["src"] / "layers.1" / WEIGHTS_FILE).read_bytes()
    assert try_to_load_from_cache(REPO, "layers.1/missing.json", cache_dir=hub_cache["cache"]) is None


def _numpy_state(sae) -> dict[str, np.ndarray]:
    if hasattr(sae, "state_dict"):
        return {name: t.detach().cpu().numpy() for name, t in sae.state_dict().items()}
    from mlx.utils import tree_flatten

    return {name: np.array(t) for name, t in tree_flatten(sae.parameters())}


def _assert_same_coder(sae, folder: Path):
    cfg, d_in, d_out, tensors = load_checkpoint_numpy(folder)
    assert sae.cfg == cfg and sae.d_in == d_in and sae.d_out == d_out
    state = _numpy_state(sae)
    assert set(state) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def _backends():
    from sae_torch import SparseCoder as TorchCoder

    backends = [pytest.param(TorchCoder, id="torch")]
    try:
        from sae_mlx import SparseCoder as MlxCoder
    except ImportError:
        backends.append(pytest.param(None, id="mlx", marks=pytest.mark.skip(reason="mlx is not installed")))
    else:
        backends.append(pytest.param(MlxCoder, id="mlx"))
    return backends


@pytest.mark.parametrize("coder_cls", _backends())
def test_load_from_hub_and_load_many(hub_cache, coder_cls):
    src = hub_cache["src"]
    sae = coder_cls.load_from_hub(REPO, hookpoint="layers.1")
    _assert_same_coder(sae, src / "layers.1")
    _assert_same_coder(coder_cls.load_from_hub(REPO, "layers.10.mlp"), src / "layers.10.mlp")
    # a branch, a tag and a commit hash all resolve through huggingface_hub's refs
    _assert_same_coder(coder_cls.load_from_hub(REPO, "layers.1", revision="v1"), hub_cache["src_v1"] / "layers.1")
    _assert_same_coder(coder_cls.load_from_hub(REPO, "layers.1", revision=hub_cache["v1"]),
                       hub_cache["src_v1"] / "layers.1")
    _assert_same_coder(coder_cls.load_from_hub(REPO, "layers.1", revision="main"), src / "layers.1")

    every = coder_cls.load_many(REPO)
    assert list(every) == list(HOOKPOINTS)  # natural order: layers.2 before layers.10.mlp
    for name, coder in every.items():
        _assert_same_coder(coder, src / name)
    assert list(coder_cls.load_many(REPO, layers=["layers.2", "layers.0"])) == ["layers.0", "layers.2"]
    assert list(coder_cls.load_many(REPO, pattern="layers.?")) == ["layers.0", "layers.1", "layers.2"]
    assert list(coder_cls.load_many(REPO, False, ["layers.1"])) == ["layers.1"]  # sparsify's positional order
    # a local folder still loads, also when spelled as a string (an existing folder wins over a hub name)
    assert list(coder_cls.load_many(str(src), layers=["layers.0"])) == ["layers.0"]
    assert list(coder_cls.load_many(src, local=True, pattern="*.mlp")) == ["layers.10.mlp"]
    encoder_only = coder_cls.load_from_hub(REPO, "layers.0", decoder=False)
    assert encoder_only.W_dec is None


def test_only_the_requested_hookpoints_are_read(hub_cache):
    """The allow_patterns cover only the requested folders: a damaged folder that was not asked for is not
    touched, the one asked for is reported."""
    from sae_torch import SparseCoder

    snapshot = hub_cache["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub_cache["main"]
    (snapshot / "layers.2" / WEIGHTS_FILE).unlink()
    SparseCoder.load_from_hub(REPO, "layers.1")
    assert list(SparseCoder.load_many(REPO, layers=["layers.0", "layers.1"])) == ["layers.0", "layers.1"]
    with pytest.raises(HubError, match=r"hookpoint 'layers.2' is only partly downloaded .*lacks sae.safetensors"):
        SparseCoder.load_many(REPO)


def test_clear_errors(hub_cache, tmp_path):
    from sae_torch import SparseCoder

    with pytest.raises(HubError, match=r"no hookpoint folder 'layers.7'; hookpoints in the local cache: layers.0, "
                                       r"layers.1, layers.2, layers.10.mlp$"):
        SparseCoder.load_from_hub(REPO, hookpoint="layers.7")
    with pytest.raises(HubError, match=r"no hookpoint folder 'layers.9'"):
        SparseCoder.load_many(REPO, layers=["layers.0", "layers.9"])
    with pytest.raises(HubError, match=r"^sae-twins-test/nope: not in the Hugging Face cache \(.*hf-cache\) and "
                                       r"HF_HUB_OFFLINE is set"):
        SparseCoder.load_from_hub("sae-twins-test/nope", hookpoint="layers.0")
    with pytest.raises(HubError, match=r"@v9: not in the Hugging Face cache"):
        SparseCoder.load_from_hub(REPO, "layers.0", revision="v9")
    with pytest.raises(HubError, match=r"no cfg.json at the repo's root; give a hookpoint \(hookpoints in the local "
                                       r"cache: layers.0, layers.1, layers.2, layers.10.mlp\)"):
        SparseCoder.load_from_hub(REPO)
    with pytest.raises(HubError, match=r"runs/typo: no such folder, and as a hub name: not in the Hugging Face"):
        SparseCoder.load_many("runs/typo")

    # a partial download: the hookpoint's cfg.json arrived, its weights did not
    snapshot = hub_cache["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub_cache["main"]
    (snapshot / "layers.1" / WEIGHTS_FILE).unlink()
    with pytest.raises(HubError, match=r"hookpoint 'layers.1' is only partly downloaded \(.*layers.1 lacks "
                                       r"sae.safetensors; holds cfg.json\); download it again with network access"):
        SparseCoder.load_from_hub(REPO, "layers.1")
    # the same when the link is there but its blob never arrived (an interrupted download)
    (snapshot / "layers.2" / WEIGHTS_FILE).resolve().unlink()
    with pytest.raises(HubError, match=r"hookpoint 'layers.2' is only partly downloaded \(.*layers.2 lacks "
                                       r"sae.safetensors; holds cfg.json\)"):
        SparseCoder.load_many(REPO, layers=["layers.2"])


def test_incomplete_snapshot_known_from_the_cached_file_listing(hub_cache):
    """After an online download huggingface_hub keeps the repo's file listing (trees/<commit>.json); offline it
    then reports a partial snapshot itself, and the hub's listing names the repo's hookpoints."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    storage = hub_cache["cache"] / f"models--{REPO.replace('/', '--')}"
    snapshot = storage / "snapshots" / hub_cache["main"]
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    entries = {path: tree_cache.TreeCacheEntry(size=(snapshot / path).stat().st_size,
                                               blob_id=hashlib.sha1(path.encode()).hexdigest(), lfs_sha256=None,
                                               lfs_size=None, xet_hash=None) for path in files}
    entries["layers.20/cfg.json"] = entries["layers.0/cfg.json"]  # on the Hub, never downloaded
    entries["layers.20/sae.safetensors"] = entries["layers.0/sae.safetensors"]
    tree_cache.write_tree_cache(str(storage), hub_cache["main"], entries)
    from sae_torch import SparseCoder

    with pytest.raises(HubError, match=r"no hookpoint folder 'layers.7'; hookpoints in the repo: layers.0, layers.1, "
                                       r"layers.2, layers.10.mlp, layers.20$"):
        SparseCoder.load_from_hub(REPO, "layers.7")
    with pytest.raises(HubError, match=r"the cached download is incomplete and the Hub cannot be reached"):
        SparseCoder.load_from_hub(REPO, "layers.20")


def _run_cli(args, cache: Path | None, *, extra_code: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["HF_HUB_CACHE"] = str(cache)
    code = f"import sys; {extra_code}from sae_core.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cli_convert_from_a_hub_name(hub_cache, tmp_path):
    """`sae convert NAME ...` in a fresh process, configured only by the environment, as a user runs it."""
    cache = hub_cache["cache"]
    out = tmp_path / "out"
    done = _run_cli(["convert", REPO, str(out), "--to", "saelens", "--hookpoint", "layers.1", "--hookpoint",
                     "layers.10.mlp"], cache)
    assert done.returncode == 0, done.stderr
    assert "layers.1: sparsify -> saelens" in done.stdout and "verified" in done.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["layers.1", "layers.10.mlp"]
    meta = json.loads((out / "layers.1" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == RUN_CONFIG["model"]  # from the repo's config.json, fetched beside the folders

    for args, message in [
        (["convert", REPO, str(tmp_path / "o1"), "--to", "saelens", "--hookpoint", "layers.7"],
         "no hookpoint folder 'layers.7'"),
        (["convert", "sae-twins-test/nope", str(tmp_path / "o2"), "--to", "saelens"],
         "sae-twins-test/nope: no such folder, and as a hub name: not in the Hugging Face cache"),
        (["eval", "sae-twins-test/nope", "--model", "gpt2"],
         "sae-twins-test/nope: no such folder, and as a hub name: not in the Hugging Face cache"),
        (["eval", REPO, "--hookpoint", "layers.7", "--model", "gpt2"], "no hookpoint folder 'layers.7'"),
    ]:
        done = _run_cli(args, cache)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr

    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub_cache["main"]
    (snapshot / "layers.2" / WEIGHTS_FILE).unlink()
    done = _run_cli(["convert", REPO, str(tmp_path / "o3"), "--to", "saelens", "--hookpoint", "layers.2"], cache)
    assert done.returncode == 2 and "hookpoint 'layers.2' is only partly downloaded" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "o3").exists()


def test_without_huggingface_hub(tmp_path):
    """A Python without huggingface_hub: hub names give one line saying what to install; folders still work."""
    hide = "sys.modules['huggingface_hub'] = None; "  # makes `import huggingface_hub` raise ImportError
    done = _run_cli(["convert", REPO, str(tmp_path / "out"), "--to", "saelens"], None, extra_code=hide)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {REPO}: no such folder (and huggingface_hub, needed to read it as a hub "
                                   f"name, is not installed: pip install huggingface_hub (or: pip install "
                                   f"'sae-twins[hub]'))")
    code = (hide + "from sae_torch import SparseCoder\ntry:\n    SparseCoder.load_from_hub('a/b', 'layers.0')\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    done = subprocess.run([sys.executable, "-c", "import sys; " + code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert done.stdout.strip() == ("HubError loading from the Hugging Face Hub needs huggingface_hub: pip install "
                                   "huggingface_hub (or: pip install 'sae-twins[hub]')"), done.stderr
    save_checkpoint_numpy(tmp_path / "local" / "layers.0", SparseCoderConfig(num_latents=8, k=2), 4, 4,
                          make_params(SparseCoderConfig(num_latents=8, k=2), 4, 4, np.random.default_rng(0)))
    done = _run_cli(["convert", str(tmp_path / "local"), str(tmp_path / "out2"), "--to", "saelens"], None,
                    extra_code=hide)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_cli_eval_from_a_hub_name(tmp_path, tiny_cfg, tiny_model_dir):
    """`sae eval NAME --hookpoint H` downloads only H, takes the model from the repo's config.json, and reports what
    evaluating the same coder from its local folder reports."""
    from conftest import run_cli
    from sae_torch.trainer import train

    train(tiny_cfg(hookpoints=["layers.2"]), progress=False, plots=False)
    coder = tmp_path / "runs" / "tiny" / "layers.2"
    files = {"config.json": json.dumps({"model": str(tiny_model_dir)}).encode()}
    files.update({f"layers.2/{name}": (coder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)})
    cache = tmp_path / "hf-cache"
    add_commit(cache, REPO, files)
    flags = ["--max_tokens", "512", "--batch_size", "2", "--quiet", "--backend", "torch"]
    hub = run_cli("eval", REPO, "--hookpoint", "layers.2", *flags,
                  env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    local = run_cli("eval", coder, "--model", tiny_model_dir, *flags)
    assert hub.returncode == 0 and local.returncode == 0, hub.stderr + local.stderr
    assert "layers.2" in hub.stdout and hub.stdout == local.stdout
