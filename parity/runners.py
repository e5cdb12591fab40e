"""Run one fixture case through a backend and return NumPy outputs, gradients and the backend's own selection.

Each backend is imported lazily, so the suite runs with whichever frameworks are installed.
"""
from __future__ import annotations

import numpy as np

from sae_core.loop import total_loss

from .fixtures import Case
from .oracle import Selection

LOSS_AUXK_ALPHA = 0.5  # larger than the training default so the AuxK gradient is well above rounding


def run_torch(case: Case, dtype: str = "float32", device: str = "cpu", auxk_alpha: float = LOSS_AUXK_ALPHA,
              checkpoint=None, coder_cls=None) -> tuple[dict, Selection, dict]:
    """Returns (outputs, selection, params as the backend held them). With `checkpoint` (a folder written by
    `case.write`), the coder is loaded from that file rather than built from the arrays. `coder_cls` swaps in a
    SparseCoder subclass (the known-bug guards inject bugs this way)."""
    import torch

    from sae_torch import SparseCoder

    coder_cls = coder_cls or SparseCoder
    torch_dtype = getattr(torch, dtype)
    if checkpoint is not None:
        sae = coder_cls.load_from_disk(checkpoint, device=device, dtype=torch_dtype)
    else:
        sae = coder_cls(case.d_in, case.cfg, device=device, dtype=torch_dtype, d_out=case.d_out)
        sae.load_state_dict({n: torch.from_numpy(v) for n, v in case.params.items()})
    sae.auxk_raise_only = case.auxk_raise_only
    x = torch.from_numpy(case.x).to(device, torch_dtype)
    y = None if case.y is None else torch.from_numpy(case.y).to(device, torch_dtype)
    dead = None if case.dead_mask is None else torch.from_numpy(case.dead_mask).to(device)

    out = sae(x, y, dead_mask=dead)
    loss = total_loss(out.fvu, out.auxk_loss, out.multi_topk_fvu, auxk_alpha)
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


def run_mlx(case: Case, dtype: str = "float32", auxk_alpha: float = LOSS_AUXK_ALPHA,
            checkpoint=None, coder_cls=None, compiled: bool = False) -> tuple[dict, Selection, dict]:
    """MLX twin of `run_torch`: (outputs, selection, params as the backend held them), gradients by parameter
    name from `nn.value_and_grad` of loss = fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8. Eager by default
    (the AuxK selection is then the exact k_aux one); with `compiled`, the loss and gradients come from that
    function under `mx.compile` as the trainer's SAE_MLX_COMPILE=all runs it (the dead mask an input, so AuxK
    takes its fixed-size form; the selection reported is the eager one, the same latents). `coder_cls` swaps in a
    SparseCoder subclass."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from sae_mlx import SparseCoder

    coder_cls = coder_cls or SparseCoder
    mlx_dtype = getattr(mx, dtype)
    if checkpoint is not None:
        sae = coder_cls.load_from_disk(checkpoint, dtype=mlx_dtype)
    else:
        sae = coder_cls(case.d_in, case.cfg, dtype=mlx_dtype, d_out=case.d_out)
        sae.load_weights([(n, mx.array(v).astype(mlx_dtype)) for n, v in case.params.items()], strict=True)
    sae.auxk_raise_only = case.auxk_raise_only
    x = mx.array(case.x).astype(mlx_dtype)
    y = None if case.y is None else mx.array(case.y).astype(mlx_dtype)
    dead = None if case.dead_mask is None else mx.array(case.dead_mask)

    def loss_fn(model, x, y, dead):
        out = model(x, y, dead_mask=dead)
        return total_loss(out.fvu, out.auxk_loss, out.multi_topk_fvu, auxk_alpha), out

    value_and_grad = nn.value_and_grad(sae, loss_fn)
    if not compiled:
        (_, out), grads = value_and_grad(sae, x, y, dead)
    else:  # None cannot be an input of a compiled function: y and the dead mask are closed over when absent
        inputs = [x] + ([] if y is None else [y]) + ([] if dead is None else [dead])

        def step(*arrays):
            rest = list(arrays[1:])
            y_in = None if y is None else rest.pop(0)
            dead_in = None if dead is None else rest.pop(0)
            return value_and_grad(sae, arrays[0], y_in, dead_in)

        (_, out), grads = mx.compile(step, inputs=[sae.state], outputs=[sae.state])(*inputs)
    mx.eval(out, grads)

    pre = sae.pre_acts(sae.encoder_input(x))
    selection = Selection(
        _mx_np(out.latent_indices),
        _mx_np(sae.aux_indices(pre, dead)) if dead is not None and bool(dead.any()) else None,
        _mx_np(sae.multi_topk_indices(pre)) if case.cfg.multi_topk else None,
    )
    outputs = {name: _mx_np(value) for name, value in out._asdict().items()}
    outputs["grads"] = {name: _mx_np(g) for name, g in tree_flatten(grads)}
    params = {name: _mx_np(p) for name, p in tree_flatten(sae.parameters())}
    return outputs, selection, params


def _mx_np(a) -> np.ndarray:
    """NumPy copy of an MLX array; floats come back as float32 (np.array() of a bf16 MLX array raises, and
    bf16 -> fp32 is exact)."""
    import mlx.core as mx

    return np.array(a.astype(mx.float32)) if mx.issubdtype(a.dtype, mx.floating) else np.array(a)
