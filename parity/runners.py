"""Run one fixture case through a backend and return NumPy outputs, gradients and the backend's own selection.

Each backend is imported lazily, so the suite runs with whichever frameworks are installed.
"""
from __future__ import annotations

import numpy as np

from .fixtures import Case
from .oracle import Selection

LOSS_AUXK_ALPHA = 0.5  # larger than the training default so the AuxK gradient is well above rounding


def run_torch(case: Case, dtype: str = "float32", device: str = "cpu", auxk_alpha: float = LOSS_AUXK_ALPHA,
              checkpoint=None) -> tuple[dict, Selection, dict]:
    """Returns (outputs, selection, params as the backend held them). With `checkpoint` (a folder written by
    `case.write`), the coder is loaded from that file rather than built from the arrays."""
    import torch

    from sae_torch import SparseCoder

    torch_dtype = getattr(torch, dtype)
    if checkpoint is not None:
        sae = SparseCoder.load_from_disk(checkpoint, device=device, dtype=torch_dtype)
    else:
        sae = SparseCoder(case.d_in, case.cfg, device=device, dtype=torch_dtype, d_out=case.d_out)
        sae.load_state_dict({n: torch.from_numpy(v) for n, v in case.params.items()})
    x = torch.from_numpy(case.x).to(device, torch_dtype)
    y = None if case.y is None else torch.from_numpy(case.y).to(device, torch_dtype)
    dead = None if case.dead_mask is None else torch.from_numpy(case.dead_mask).to(device)

    out = sae(x, y, dead_mask=dead)
    loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
    loss.backward()

    with torch.no_grad():
        pre = sae.pre_acts(sae.encoder_input(x))
        selection = Selection(
            _np(out.latent_indices),
            _np(sae.aux_indices(pre, dead)) if dead is not None and dead.any() else None,
            _np(sae.multi_topk_indices(pre)) if case.cfg.multi_topk else None,
        )
    outputs = {name: _np(value) for name, value in out._asdict().items()}
    outputs["grads"] = {name: _np(p.grad) for name, p in sae.named_parameters()}
    params = {name: _np(p) for name, p in sae.named_parameters()}
    return outputs, selection, params


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
