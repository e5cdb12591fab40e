"""Worker process of the benchmark: ``python -m bench.worker MODE JSON_ARGS RESULT_PATH``.

Modes: ``time`` (all torch sides of one config, steps interleaved), ``memory`` (one side of one config, in this
fresh process), ``kernels`` (kernel micro-benchmarks), ``profile`` (per-kernel table of each side's step), ``mlx``
(the MLX backend: time and memory). Each writes one JSON object to RESULT_PATH. The orchestrator (`bench.cli`)
starts them; they are not meant to be run by hand.
"""
from __future__ import annotations

import functools
import json
import sys
import time
import traceback


def _setup(args):
    import torch

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    if args["device"].startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # as sparsify's trainer does
    return torch


# ---------------------------------------------------------------------------------------------------------------


def mode_time(args) -> dict:
    _setup(args)  # for its side effects: thread count and matmul precision
    from bench.common import BenchConfig, Timer, build_side, initial_state, make_data, summarize, train_step

    cfg = BenchConfig.from_dict(args["config"])
    device = args["device"]
    x, dead = make_data(cfg, device)
    dead_arg = dead if cfg.num_dead else None
    state = initial_state(cfg, x)
    sides = {s: build_side(s, cfg, state, device) for s in args["sides"]}
    timer = Timer(device)
    times = {s: [] for s in sides}
    losses = {s: [] for s in sides}
    order = list(sides)
    for rep in range(args["warmup"] + args["reps"]):
        rot = order[rep % len(order):] + order[: rep % len(order)]  # rotate who goes first
        for s in rot:
            sae, opt = sides[s]
            box = {}
            dt = timer(lambda: box.setdefault("loss", train_step(sae, opt, x, dead_arg, device)))
            losses[s].append(box["loss"])
            if rep >= args["warmup"]:
                times[s].append(dt)
    out = {"sides": {s: {**summarize(times[s]), "losses": losses[s]} for s in sides}}
    out["gemm"] = gemm_floor(cfg, device, reps=args["reps"])
    return out


def gemm_floor(cfg, device: str, reps: int) -> dict:
    """The dense encoder GEMM alone, x [N, d_in] @ W_enc^T + b: bf16 on CUDA (the physical floor of a step under
    bf16 autocast), fp32 on CPU (the precision the CPU step runs in)."""
    import torch
    import torch.nn.functional as F

    from bench.common import Timer, summarize

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_tokens, cfg.d_in, generator=g).to(device, dtype)
    w = torch.randn(cfg.num_latents, cfg.d_in, generator=g).to(device, dtype)
    b = torch.zeros(cfg.num_latents, device=device, dtype=dtype)
    timer = Timer(device)
    timer(lambda: F.linear(x, w, b))
    ts = [timer(lambda: F.linear(x, w, b)) for _ in range(max(3, reps))]
    return {"dtype": str(dtype).replace("torch.", ""), **summarize(ts),
            "flops": 2 * cfg.n_tokens * cfg.d_in * cfg.num_latents}


# ---------------------------------------------------------------------------------------------------------------


def mode_memory(args) -> dict:
    _setup(args)  # for its side effects: thread count and matmul precision
    from bench import memory
    from bench.common import BenchConfig, build_side, initial_state, make_data, train_step

    cfg = BenchConfig.from_dict(args["config"])
    device = args["device"]
    x, dead = make_data(cfg, device)
    dead_arg = dead if cfg.num_dead else None
    state = initial_state(cfg, x)
    sae, opt = build_side(args["side"], cfg, state, device)
    del state

    def step(marks):
        train_step(sae, opt, x, dead_arg, device, marks)

    step(None)  # first step: lazy initialisations of torch and the libraries happen here, not in the measure
    out = {"side": args["side"]}
    if device.startswith("cuda"):
        out["cuda"] = memory.cuda_step(step)
    else:
        out["rss"] = memory.rss_step_cpu(step, n_steps=1)
        out["tensor"] = memory.profile_step_cpu(step)
    return out


# ---------------------------------------------------------------------------------------------------------------


def mode_kernels(args) -> dict:
    """Decode forward/backward and encoder backward of ours against sparsify's, on the top-k and on the AuxK index
    set of one config; for AuxK also `subset_decode` (the dense-subset path the coder takes when few latents are
    dead) and which path the coder takes. On CPU with args["candidates"]: bench/candidates.py against sae_torch's
    two backward primitives."""
    torch = _setup(args)
    import torch.nn.functional as F

    from bench import candidates as C
    from bench.common import BenchConfig, Timer, import_sparsify, initial_state, make_data, summarize
    from sae_torch import SparseCoder
    from sae_torch.kernels import sparse_rows as sr
    from sae_torch.kernels.row_subset import subset_decode

    cfg = BenchConfig.from_dict(args["config"])
    device = args["device"]
    reps = args["reps"]
    x, dead = make_data(cfg, device)
    state = initial_state(cfg, x)
    w_enc = state["encoder.weight"].to(device)
    b_enc = state["encoder.bias"].to(device)
    w_dec = state["W_dec"].to(device)
    x_in = x - state["b_dec"].to(device)
    with torch.no_grad():  # the selections, as SparseCoder.forward makes them
        pre = F.relu(F.linear(x_in, w_enc, b_enc))
        top_acts, top_idx = pre.topk(cfg.k, dim=1, sorted=False)
        sets = {"top": (top_idx, top_acts)}
        if cfg.num_dead:
            dead_idx = dead.nonzero().squeeze(1)
            k_aux = min(cfg.d_in // 2, cfg.num_dead)
            aux_acts, aux_slots = pre.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False)
            sets["aux"] = (dead_idx[aux_slots], aux_acts)
            # what subset_decode takes: the AuxK activations as a dense [N, |D|] matrix, zero outside the slots
            aux_dense = torch.zeros(cfg.n_tokens, dead_idx.numel(), device=device).scatter_(1, aux_slots, aux_acts)
        del pre
    g = torch.Generator().manual_seed(cfg.seed + 7)
    grad_out = torch.randn(cfg.n_tokens, cfg.d_in, generator=g).to(device)

    have_sparsify = args.get("sparsify", False)
    if have_sparsify:
        import_sparsify(device)
        from sparsify.fused_encoder import FusedEncoder
        from sparsify.utils import decoder_impl, eager_decode

    timer = Timer(device)
    cuda = device.startswith("cuda")
    ac = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def timed(fn):
        """(summary of `reps` timed calls, the last call's output). One warm-up call first, except that an op
        slower than 1 s is warm after one call, so that call counts as a rep."""
        last = []

        def call():
            last.clear()  # free the previous output before the next is made
            last.append(fn())

        first = timer(call)
        times = [first] if first > 1.0 else []
        times += [timer(call) for _ in range(reps - len(times))]
        return summarize(times), last[0]

    def run(fn):
        return timed(fn)[0]

    def bwd_only(make):
        """Time only the backward: the graph is built once and kept (retain_graph)."""
        out, inputs = make()
        grad = grad_out if out.shape == grad_out.shape else torch.randn_like(out)
        return run(lambda: torch.autograd.grad(out, inputs, grad.to(out.dtype), retain_graph=True))

    def leaves(*tensors):
        return tuple(t.clone().requires_grad_() for t in tensors)

    res = {"decode_forward": {}, "decode_backward": {}, "encoder_backward": {}, "auxk_backward": {},
           "candidates": {}}
    for name, (idx, acts) in sets.items():
        key = f"{name} (N={cfg.n_tokens}, k={idx.shape[1]}, d={cfg.d_in}, M={cfg.num_latents})"
        a = acts.detach().clone()
        # --- decode forward
        df = res["decode_forward"][key] = {}
        with ac:
            df["ours"] = run(lambda: sr.gather_weighted_sum(a, idx, w_dec))
            if have_sparsify:
                df["sparsify decoder_impl"] = run(lambda: decoder_impl(idx, a, w_dec.mT))
                if cuda:
                    df["sparsify eager_decode"] = run(lambda: eager_decode(idx, a, w_dec.mT))

        # --- decode backward (d_acts and d_W_dec)
        db = res["decode_backward"][key] = {}

        def mk_ours_dec():
            aa, ww = leaves(a, w_dec)
            with ac:
                return sr.sparse_decode(aa, idx, ww), (aa, ww)

        db["ours"] = bwd_only(mk_ours_dec)
        if have_sparsify:
            def mk_sp_dec(fn):
                aa, ww = leaves(a, w_dec)
                with ac:
                    return fn(idx, aa, ww.mT), (aa, ww)

            db["sparsify decoder_impl"] = bwd_only(lambda: mk_sp_dec(decoder_impl))
            if cuda:
                db["sparsify eager_decode"] = bwd_only(lambda: mk_sp_dec(eager_decode))

        # --- encoder backward (d_x, d_W_enc, d_b_enc) for the selected latents
        eb = res["encoder_backward"][key] = {}

        def mk_ours_enc():
            xx, ww, bb = leaves(x_in, w_enc, b_enc)
            with ac:  # as SparseCoder.acts_at: values gathered from the dense pre-activations, sparse backward
                values = a - bb.detach()[idx]
                return F.relu(sr.sparse_encode(xx, ww, idx, values=values) + bb[idx]), (xx, ww, bb)

        eb["ours"] = bwd_only(mk_ours_enc)
        if have_sparsify and name == "top":
            def mk_sp_enc():
                xx, ww, bb = leaves(x_in, w_enc, b_enc)
                with ac:
                    vals, _, _ = FusedEncoder.apply(xx, ww, bb, cfg.k, "topk")
                return vals, (xx, ww, bb)

            eb["sparsify fused_encoder"] = bwd_only(mk_sp_enc)
        elif name == "aux":
            eb["sparsify fused_encoder"] = {"note": "sparsify sends no gradient from AuxK into the encoder"}

        # --- the whole AuxK backward by each path, and the one SparseCoder takes
        if name == "aux":
            ab = res["auxk_backward"][key] = {}
            ab["ours sparse kernels (decode backward + encoder backward above)"] = {
                "median_s": db["ours"]["median_s"] + eb["ours"]["median_s"]}

            def mk_subset():
                xx, ww, bb, wd = leaves(x_in, w_enc, b_enc, w_dec)
                with ac:
                    return subset_decode(aux_dense, dead_idx, xx, ww, bb, wd), (xx, ww, bb, wd)

            ab["ours subset_decode (dense-subset AuxK: encoder AND decoder backward)"] = bwd_only(mk_subset)
            if have_sparsify:
                ab["sparsify (decode backward above; no encoder gradient)"] = {
                    "median_s": db["sparsify decoder_impl"]["median_s"]}
            ratio, fraction = SparseCoder.aux_dense_max_ratio, SparseCoder.aux_dense_max_fraction
            num_dead = dead_idx.numel()
            dense_path = num_dead <= ratio * k_aux and num_dead <= fraction * cfg.num_latents
            res["auxk_path"] = (
                f"SparseCoder takes {'subset_decode' if dense_path else 'the sparse kernels'} here: "
                f"{num_dead} dead latents, dense when <= aux_dense_max_ratio ({ratio:g}) x k_aux ({k_aux}) = "
                f"{ratio * k_aux:g} and <= aux_dense_max_fraction ({fraction:g}) x M ({cfg.num_latents}) = "
                f"{fraction * cfg.num_latents:g}")

        # --- CPU alternatives for the two backward primitives, against sae_torch's
        if not cuda and args.get("candidates"):
            w = torch.randn(idx.shape, generator=g).to(device)
            cand = res["candidates"][key] = {}
            for prim, current, alternatives, inputs in [
                    ("gather_dot", sr.gather_dot_reference, C.GATHER_DOT, (grad_out, w_dec, idx)),
                    ("scatter_outer", sr.scatter_outer_reference, C.SCATTER_OUTER, (w, idx, x_in, cfg.num_latents))]:
                summary, ref = timed(functools.partial(current, *inputs))
                cand[prim] = {"sae_torch (current)": {**summary, "max_abs_err_vs_current": 0.0}}
                for cname, fn in alternatives.items():
                    summary, out = timed(functools.partial(fn, *inputs))
                    cand[prim][cname] = {**summary, "max_abs_err_vs_current": float((out - ref).abs().max())}
                    del out
                del ref
    return res


# ---------------------------------------------------------------------------------------------------------------


def mode_profile(args) -> dict:
    """Per-kernel table of each side's training step (torch.profiler): after one warm-up step per side,
    args["steps"] profiled steps per side. On CUDA the table is sorted by self device time (each GPU kernel's own
    time) and `busy_s_per_step` (the sum of kernel times) shows how much of the step keeps the GPU busy; on CPU by
    self CPU time (each aten op's own time)."""
    torch = _setup(args)
    from torch.profiler import ProfilerActivity, profile

    from bench.common import BenchConfig, build_side, initial_state, make_data, train_step

    cfg = BenchConfig.from_dict(args["config"])
    device = args["device"]
    cuda = device.startswith("cuda")
    x, dead = make_data(cfg, device)
    dead_arg = dead if cfg.num_dead else None
    state = initial_state(cfg, x)
    steps = int(args["steps"])
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {"steps": steps, "sorted_by": sort_key, "sides": {}}
    for side in args["sides"]:
        sae, opt = build_side(side, cfg, state, device)
        train_step(sae, opt, x, dead_arg, device)  # warm-up: lazy initialisation, Triton compilation
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(sae, opt, x, dead_arg, device)
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / steps
        averages = prof.key_averages()
        rows = sorted(({"name": e.key, "calls_per_step": e.count / steps,
                        "self_s_per_step": getattr(e, sort_key) / 1e6 / steps} for e in averages),
                      key=lambda r: -r["self_s_per_step"])
        rows = [r for r in rows if r["self_s_per_step"] > 0]
        n_rows = int(args.get("rows", 25))
        entry = {"wall_s_per_step": wall, "top": rows[:n_rows],
                 "table": averages.table(sort_by=sort_key, row_limit=n_rows, max_name_column_width=90)}
        if cuda:
            kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
            entry["busy_s_per_step"] = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
            entry["kernel_launches_per_step"] = sum(e.count for e in kernels) / steps
        out["sides"][side] = entry
        del sae, opt
    return out


# ---------------------------------------------------------------------------------------------------------------


def mode_mlx(args) -> dict:
    from bench.mlx_side import run_mlx

    return run_mlx(args)


MODES = {"time": mode_time, "memory": mode_memory, "kernels": mode_kernels, "mlx": mode_mlx, "profile": mode_profile}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    mode, raw, result_path = argv
    args = json.loads(raw)
    t0 = time.perf_counter()
    try:
        out = {"ok": True, **MODES[mode](args)}
    except Exception as e:  # reported, not raised: the orchestrator records it next to the other results
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["worker_wall_s"] = time.perf_counter() - t0
    with open(result_path, "w") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main()
