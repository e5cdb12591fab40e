"""Float64 checkpoints (sparsify can save them, torch users train in fp64) load in MLX as float32: the Metal GPU
has no float64 and `mx.load` refuses F64 files. A real F64 safetensors file, written by torch's safetensors."""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from parity.fixtures import make_case  # noqa: E402
from sae_core.checkpoint import WEIGHTS_FILE, read_header, write_config  # noqa: E402
from sae_mlx import SparseCoder as MlxCoder  # noqa: E402
from sae_torch import SparseCoder as TorchCoder  # noqa: E402


def test_float64_checkpoint_loads_as_float32_and_runs(tmp_path):
    case = make_case(transcode=True, skip_connection=True)
    folder = tmp_path / "f64"
    folder.mkdir()
    save_file({name: torch.from_numpy(value.astype(np.float64)) for name, value in case.params.items()},
              str(folder / WEIGHTS_FILE))
    write_config(folder, case.cfg, case.d_in, case.d_out)
    header, _ = read_header(folder / WEIGHTS_FILE)
    assert {entry["dtype"] for entry in header.values()} == {"F64"}
    with pytest.raises(Exception, match="F64"):  # what a plain mx.load does with this file
        mx.load(str(folder / WEIGHTS_FILE))

    sae = MlxCoder.load_from_disk(folder)
    state = dict(tree_flatten(sae.parameters()))
    assert sae.dtype == mx.float32 and {a.dtype for a in state.values()} == {mx.float32}
    for name, value in case.params.items():
        np.testing.assert_array_equal(np.array(state[name]), value.astype(np.float64).astype(np.float32))
    assert MlxCoder.load_from_disk(folder, dtype=mx.bfloat16).dtype == mx.bfloat16

    # the same forward as torch on the float64 file (torch also loads it as float32)
    ref = TorchCoder.load_from_disk(folder)
    assert ref.dtype == torch.float32
    x, y = case.x.astype(np.float32), case.y.astype(np.float32)
    got = sae(mx.array(x), mx.array(y))
    mx.eval(got)
    want = ref(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(np.array(got.sae_out), want.sae_out.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.sort(np.array(got.latent_indices), 1), np.sort(want.latent_indices.numpy(), 1))
