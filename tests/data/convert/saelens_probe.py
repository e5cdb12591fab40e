"""Run inside a Python that has sae_lens (called by tests/test_convert.py in a subprocess).

    python saelens_probe.py REPO_ROOT SPEC.json

SPEC: {"x": "inputs.npy",
       "make": [{"folder", "architecture": "topk", "d_in", "d_sae", "k", "seed", "rescale", "apply_b_dec"}],
       "load": [{"folder", "out"}]}
"make" builds SAELens-native TopK SAEs with random weights (decoder rows not unit norm, b_dec != 0) and saves them
with SAELens's own save_model; "load" loads a folder with SAE.load_from_disk (after registering our TopK
transcoders) and saves SAELens's dense encode(x) and forward(x) to `out` (.npz). Every "make" folder is also loaded.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, sys.argv[1])
from sae_lens import SAE  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # noqa: E402

from sae_core.saelens import register_with_sae_lens  # noqa: E402

spec = json.loads(Path(sys.argv[2]).read_text())
x = torch.from_numpy(np.load(spec["x"]).astype(np.float32))
register_with_sae_lens()
loads = list(spec.get("load", []))
for item in spec.get("make", []):
    torch.manual_seed(item["seed"])
    cfg = TopKSAEConfig(d_in=item["d_in"], d_sae=item["d_sae"], k=item["k"],
                        rescale_acts_by_decoder_norm=item["rescale"], apply_b_dec_to_input=item["apply_b_dec"])
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, item["d_in"] ** -0.5)
        sae.b_enc.normal_(0, 0.05)
        sae.W_dec.normal_(0, 1.0).mul_(torch.rand(item["d_sae"], 1) * 2 + 0.25)  # row norms far from 1
        sae.b_dec.normal_(0, 0.3)
    sae.save_model(item["folder"])
    loads.append({"folder": item["folder"], "out": item["out"]})
info = {}
for item in loads:
    sae = SAE.load_from_disk(item["folder"])
    sae.eval()
    with torch.no_grad():
        feats = sae.encode(x.to(sae.dtype))
        out = sae(x.to(sae.dtype))
    np.savez(item["out"], feats=feats.float().numpy(), out=out.float().numpy())
    info[item["folder"]] = type(sae).__name__
import sae_lens  # noqa: E402

print(json.dumps({"sae_lens": sae_lens.__version__, "classes": info}))
