"""Run inside a Python that has sae_lens (called by tests/test_convert.py in a subprocess).

    python saelens_hooks_probe.py REPO_ROOT SPEC.json

SPEC: {"tokens": "tokens.npy", "folders": [SAELens folder, ...], "out": "hooks.npz"}
Each folder is loaded with SAE.load_from_disk; the model its metadata names is loaded the way SAELens's tools load
it (sae_lens.load_model with the metadata's model_class_name), and run with run_with_cache over the tokens, reading
the metadata's hook_name (and hook_name_out). Saves, per folder i: `in{i}` (the activations at hook_name), `out{i}`
(at hook_name_out, transcoders only) and `sae{i}` (the coder's forward on `in{i}`), all [tokens, d] float32.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, sys.argv[1])
from sae_lens import SAE  # noqa: E402
from sae_lens.load_model import load_model  # noqa: E402

from sae_core.saelens import register_with_sae_lens  # noqa: E402

spec = json.loads(Path(sys.argv[2]).read_text())
tokens = torch.from_numpy(np.load(spec["tokens"]).astype(np.int64))
register_with_sae_lens()
arrays, models = {}, {}
for i, folder in enumerate(spec["folders"]):
    sae = SAE.load_from_disk(folder)
    sae.eval()
    meta = sae.cfg.metadata
    key = (meta.model_class_name, meta.model_name)
    if key not in models:
        models[key] = load_model(meta.model_class_name, meta.model_name, device="cpu")
    names = [meta.hook_name] + ([meta.hook_name_out] if meta.hook_name_out else [])
    with torch.no_grad():
        _, cache = models[key].run_with_cache(tokens, names_filter=names)
        x = cache[meta.hook_name].flatten(0, 1).float()
        arrays[f"in{i}"] = x.numpy()
        if meta.hook_name_out:
            arrays[f"out{i}"] = cache[meta.hook_name_out].flatten(0, 1).float().numpy()
        arrays[f"sae{i}"] = sae(x.to(sae.dtype)).float().numpy()
np.savez(spec["out"], **arrays)
print(json.dumps({"models": [list(key) for key in models]}))
