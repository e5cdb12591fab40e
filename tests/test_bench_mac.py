"""The Mac side of `python -m bench`: --mlx-variants times the MLX step once per Metal-kernel variant (one row
each, saying what ran), and --device mps is refused with a clear message where torch has no MPS."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from conftest import REPO  # noqa: E402
from bench.cli import parse_mlx_variants, resolve_device  # noqa: E402


def test_variants_parse_into_the_kernel_settings():
    variants = parse_mlx_variants("default,topk=metal+scatter=segmented")
    assert variants["default"] == {"SAE_MLX_TOPK": "argpartition", "SAE_MLX_GWS": "scalar",
                                   "SAE_MLX_GATHER_DOT": "lanes", "SAE_MLX_SCATTER": "serial"}
    assert variants["topk=metal+scatter=segmented"]["SAE_MLX_TOPK"] == "metal"
    assert variants["topk=metal+scatter=segmented"]["SAE_MLX_SCATTER"] == "segmented"
    with pytest.raises(SystemExit, match="unknown setting 'scatter=atomic'"):
        parse_mlx_variants("scatter=atomic")


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may have MPS")
def test_mps_refused_without_mps():
    with pytest.raises(SystemExit, match="torch sees no Metal"):
        resolve_device("mps")


def test_quick_bench_times_each_mlx_variant(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sides", "ours", "--no-memory", "--no-kernels",
         "--mlx-variants", "default,topk=metal+gws=wide", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (entry,) = json.loads((tmp_path / "results.json").read_text())["configs"]
    variant = entry["mlx_variants"]["topk=metal+gws=wide"]
    assert entry["mlx"]["ok"] and variant["ok"] and variant["losses"][0] == pytest.approx(entry["mlx"]["losses"][0])
    metal = variant["metal"]
    assert (variant["kernels"]["topk"] == "metal") if metal else variant["kernels"].startswith("pure-MLX")
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if "ours (sae_mlx)" in line]
    assert len(rows) == 2 and "kernels topk=metal+gws=wide" in rows[1]
