"""The MLX backend's training step on the same config and the same data as the torch sides (run by bench.worker).

Same step as `bench.common.train_step`: loss = fvu + auxk_alpha * auxk + multi_topk_fvu / 8, value_and_grad,
decoder-gradient projection, signum (m = 0.95 m + 0.05 g; p -= lr * sign(m)), W_dec renormalisation, then
`mx.eval` of everything (MLX is lazy: the step is timed up to the end of that eval). Eager (no `mx.compile`).
Peak memory: `mx.get_peak_memory()` after `mx.reset_peak_memory()`, minus the active memory before the step
(MLX's own allocator; on Linux that is its CPU allocator, on a Mac the unified-memory Metal allocator).
"""
from __future__ import annotations

import os
import time


def run_mlx(args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from bench.common import AUXK_ALPHA, SIGNUM_MOMENTUM, BenchConfig, initial_state, make_data, summarize
    from sae_core.loop import total_loss

    try:
        from sae_mlx import SparseCoder
    except Exception as e:  # the backend is being written: report, do not fail the run
        return {"skipped": f"sae_mlx does not import: {type(e).__name__}: {e}"}
    from sae_core.config import SparseCoderConfig
    from sae_mlx.kernels.sparse_rows import GATHER_DOT_ENV, GWS_ENV, SCATTER_ENV, kernel_variant, use_metal
    from sae_mlx.kernels.topk import use_metal_topk

    cfg = BenchConfig.from_dict(args["config"])
    x_t, dead_t = make_data(cfg, "cpu")
    state = initial_state(cfg, x_t)
    x = mx.array(x_t.numpy())
    dead = mx.array(dead_t.numpy()) if cfg.num_dead else None
    sae = SparseCoder(cfg.d_in, SparseCoderConfig(k=cfg.k, multi_topk=cfg.multi_topk))
    sae.update(tree_unflatten([(n, mx.array(t.numpy())) for n, t in state.items()]))
    lr = 5e-3 / (cfg.num_latents / 2**14) ** 0.5
    moments = tree_map(lambda p: mx.zeros_like(p), sae.trainable_parameters())
    mx.eval(sae.parameters(), moments, x)

    def loss_fn(model, x, dead):
        out = model(x, dead_mask=dead)
        return total_loss(out.fvu, out.auxk_loss, out.multi_topk_fvu, AUXK_ALPHA)

    value_and_grad = nn.value_and_grad(sae, loss_fn)

    def step():
        nonlocal moments
        loss, grads = value_and_grad(sae, x, dead)
        grads = sae.remove_gradient_parallel_to_decoder_directions(grads)
        moments = tree_map(lambda m, g: SIGNUM_MOMENTUM * m + (1 - SIGNUM_MOMENTUM) * g, moments, grads)
        params = tree_map(lambda p, m: p - lr * mx.sign(m), sae.trainable_parameters(), moments)
        sae.update(params)
        sae.set_decoder_norm_to_unit_norm()
        mx.eval(loss, sae.parameters(), moments)
        return float(loss.item())

    losses, times = [], []
    for i in range(args["warmup"] + args["reps"]):
        t0 = time.perf_counter()
        losses.append(step())
        dt = time.perf_counter() - t0
        if i >= args["warmup"]:
            times.append(dt)
    mx.clear_cache()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    step()
    peak = mx.get_peak_memory()
    return {
        "time": summarize(times),
        "losses": losses,
        "memory": {"peak_bytes": max(0, peak - active), "active_before_bytes": active, "peak_abs_bytes": peak},
        "warmup": args["warmup"],
        "blas": os.environ.get("LD_PRELOAD", "") or "MLX's bundled BLAS (single-threaded reference on Linux)",
        "blas_short": ("Metal" if getattr(mx, "metal", None) and mx.metal.is_available() else
                       "CPU, OpenBLAS preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else "CPU"),
        "mlx_device": str(mx.default_device()),
        # what ran: the variants apply to the Metal kernels; without Metal the references run
        "kernels": ({"topk": "metal" if use_metal_topk() else "argpartition",
                     **{env: kernel_variant(env) for env in (GWS_ENV, GATHER_DOT_ENV, SCATTER_ENV)}}
                    if use_metal() else "pure-MLX references (no Metal)"),
        "metal": bool(getattr(mx, "metal", None) and mx.metal.is_available()),
        "params": len(tree_flatten(sae.parameters())),
    }
