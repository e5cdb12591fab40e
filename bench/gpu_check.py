"""`python -m bench.gpu_check`: the kernels landed behind a setting, against the default path, at real sizes.

For a session with a GPU (bench/gpu_session.sh runs it): for each shape, the one-read Triton top-k
(`sae_torch.kernels.topk`, methods "max" and "bitonic") against ReLU + torch.topk (the coder's default), and the
tensor-core scatter_outer (kernel="dot") against the default Triton one ("segment") and the reference: whether they
agree, and each one's median time (CUDA events). Then one SparseCoder training step (bf16 autocast, AuxK with dead
latents) with every selection_kernel / scatter_kernel against the defaults: the losses and each parameter gradient's
relative difference. Prints a table and writes JSON (--out).

On CPU it runs the same code in Triton's interpreter at tiny sizes (`--tiny`; the environment must set
TRITON_INTERPRET=1 and SAE_TRITON_CPU=1 before Python starts), which is how the tests keep it working.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def _timed(fn, device: str, reps: int):
    import time

    import torch

    out = fn()  # warm-up (Triton compiles here)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def check_selection(n: int, m: int, k: int, k_aux: int, device: str, reps: int) -> dict:
    import torch

    from sae_torch.kernels.topk import select_topk_reference, select_topk_triton

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(n, m, generator=g).to(device, torch.bfloat16)
    dead = (torch.rand(m, generator=g) < 0.05).to(device)
    k_aux = min(k_aux, int(dead.sum()))
    t_ref, ref = _timed(lambda: select_topk_reference(pre, k, aux_mask=dead, k_aux=k_aux), device, reps)
    t_topk_only, _ = _timed(lambda: pre.topk(k, dim=-1, sorted=False), device, reps)
    row = {"shape": f"N={n} M={m} k={k} k_aux={k_aux} bf16", "torch relu+topk+auxk_s": t_ref,
           "torch topk(k) alone_s": t_topk_only}
    for method in ("max", "bitonic"):
        t, sel = _timed(lambda how=method: select_topk_triton(pre, k, aux_mask=dead, k_aux=k_aux, method=how),
                        device, reps)
        same = (torch.equal(sel.values.sort(-1).values, ref.values.sort(-1).values)
                and torch.equal(sel.aux_values.sort(-1).values, ref.aux_values.sort(-1).values))
        row[f"triton {method}_s"] = t
        row[f"triton {method} same values"] = bool(same)
    return row


def check_scatter(n: int, m: int, k: int, d: int, device: str, reps: int) -> dict:
    import torch

    from sae_torch.kernels import sparse_rows as sr

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, m, (n, k), generator=g).to(device)
    w = torch.randn(n, k, generator=g).to(device, torch.bfloat16)
    rows = torch.randn(n, d, generator=g).to(device, torch.bfloat16)
    t_ref, ref = _timed(lambda: sr.scatter_outer_reference(w, idx, rows, m), device, reps)
    row = {"shape": f"N={n} M={m} k={k} d={d} bf16", "reference_s": t_ref}
    scale = ref.float().abs().max().item() or 1.0
    for kernel in sr.SCATTER_KERNELS:
        t, out = _timed(lambda kn=kernel: sr.scatter_outer_triton(w, idx, rows, m, kernel=kn), device, reps)
        row[f"triton {kernel}_s"] = t
        row[f"triton {kernel} max rel err"] = (out.float() - ref.float()).abs().max().item() / scale
    return row


def check_coder(d_in: int, k: int, n: int, device: str) -> list[dict]:
    import torch

    from sae_core.config import SparseCoderConfig
    from sae_torch import SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(k=k), device=device)
    x = torch.randn(n, d_in, device=device)
    dead = torch.rand(sae.num_latents, device=device) < 0.05
    cuda = device.startswith("cuda")

    def step(selection: str, scatter: str):
        sae.zero_grad()
        sae.selection_kernel, sae.scatter_kernel = selection, scatter
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        return out, {name: p.grad.float().clone() for name, p in sae.named_parameters()}

    base, base_grads = step("torch", "segment")
    rows = []
    for selection, scatter in [("triton", "segment"), ("triton-bitonic", "segment"), ("torch", "dot"),
                               ("triton", "dot")]:
        out, grads = step(selection, scatter)
        rows.append({"coder": f"d_in={d_in} k={k} N={n}", "selection_kernel": selection, "scatter_kernel": scatter,
                     "fvu": float(out.fvu), "fvu default": float(base.fvu),
                     "auxk": float(out.auxk_loss), "auxk default": float(base.auxk_loss),
                     "worst grad rel diff": max(
                         ((grads[nm] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                         for nm, g in base_grads.items())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU interpreter test)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="write the JSON here")
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu_check: torch sees no CUDA device (use --device cpu --tiny with TRITON_INTERPRET=1 and "
              "SAE_TRITON_CPU=1)", file=sys.stderr)
        return 2
    if a.tiny:
        sel_shapes, scatter_shapes, coder = [(16, 300, 4, 8)], [(16, 40, 4, 24)], (16, 4, 24)
    else:
        sel_shapes = [(4096, 24576, 32, 384), (16384, 65536, 64, 1024)]
        scatter_shapes = [(4096, 24576, 32, 768), (16384, 65536, 64, 2048)]
        coder = (768, 32, 4096)
    result = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else a.device,
              "torch": torch.__version__,
              "selection": [check_selection(*s, a.device, a.reps) for s in sel_shapes],
              "scatter_outer": [check_scatter(*s, a.device, a.reps) for s in scatter_shapes],
              "coder_step": check_coder(*coder, a.device)}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
