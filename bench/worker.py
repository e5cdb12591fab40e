"""Worker process of the benchmark: ``python -m bench.worker MODE JSON_ARGS RESULT_PATH``.

Modes: ``time`` (all torch sides of one config, steps interleaved), ``memory`` (one side of one config, in this
fresh process), ``kernels`` (kernel micro-benchmarks), ``mlx`` (the MLX backend: time and memory). Each writes one
JSON object to RESULT_PATH. The orchestrator (`bench.cli`) starts them; they are not meant to be run by hand.
"""
from __future__ import annotations

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
    torch = _setup(args)
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
    torch = _setup(args)
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
    torch = _setup(args)
    import torch.nn.functional as F

    from bench import proposed as P
    from bench.common import BenchConfig, Timer, import_sparsify, initial_state, make_data, summarize
    from sae_torch.kernels import sparse_rows as sr

    cfg = BenchConfig.from_dict(args["config"])
    device = args["device"]
    reps = args["reps"]
    x, dead = make_data(cfg, device)
    state = initial_state(cfg, x)
    w_enc = state["encoder.weight"].to(device)
    b_enc = state["encoder.bias"].to(device)
    w_dec = state["W_dec"].to(device)
    x_in = x - state["b_dec"].to(device)
    with torch.no_grad():
        pre = F.relu(F.linear(x_in, w_enc, b_enc))
        top_acts, top_idx = pre.topk(cfg.k, dim=1, sorted=False)
        sets = {"top": (top_idx, top_acts)}
        if cfg.num_dead:
            dead_idx = dead.nonzero().squeeze(1)
            k_aux = min(cfg.d_in // 2, cfg.num_dead)
            sub = pre.index_select(1, dead_idx)
            aux_acts, aux_local = sub.topk(k_aux, dim=1, sorted=False)
            sets["aux"] = (dead_idx[aux_local], aux_acts)
            del sub
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

    def run(fn):
        first = timer(fn)  # warm-up; an op slower than 1 s is warm after one call, so that call counts as a rep
        times = [first] if first > 1.0 else []
        return summarize(times + [timer(fn) for _ in range(reps - len(times))])

    def bwd_only(make):
        """Time only the backward: the graph is built once and kept (retain_graph)."""
        out, inputs = make()
        grad = grad_out if out.shape == grad_out.shape else torch.randn_like(out)
        fn = lambda: torch.autograd.grad(out, inputs, grad.to(out.dtype), retain_graph=True)
        return run(fn)

    res = {"decode_forward": {}, "decode_backward": {}, "encoder_backward": {}, "candidates": {}}
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

        def mk_ours_dec(fn=sr.sparse_decode):
            aa, ww = a.clone().requires_grad_(), w_dec.clone().requires_grad_()
            with ac:
                return fn(aa, idx, ww), (aa, ww)

        db["ours"] = bwd_only(mk_ours_dec)
        db["proposed"] = bwd_only(lambda: mk_ours_dec(P.FastDecode.apply))
        if have_sparsify:
            def mk_sp_dec(fn):
                aa, ww = a.clone().requires_grad_(), w_dec.clone().requires_grad_()
                with ac:
                    return fn(idx, aa, ww.mT), (aa, ww)

            db["sparsify decoder_impl"] = bwd_only(lambda: mk_sp_dec(decoder_impl))
            if cuda:
                db["sparsify eager_decode"] = bwd_only(lambda: mk_sp_dec(eager_decode))

        # --- encoder backward (d_x, d_W_enc, d_b_enc) for the selected latents
        eb = res["encoder_backward"][key] = {}

        def mk_ours_enc():
            xx, ww, bb = x_in.clone().requires_grad_(), w_enc.clone().requires_grad_(), b_enc.clone().requires_grad_()
            with ac:
                return F.relu(sr.sparse_encode(xx, ww, idx) + bb[idx]), (xx, ww, bb)

        def mk_prop_enc():
            xx, ww, bb = x_in.clone().requires_grad_(), w_enc.clone().requires_grad_(), b_enc.clone().requires_grad_()
            with ac:
                return P.SelectedEncode.apply(a, xx, ww, bb, idx), (xx, ww, bb)

        eb["ours"] = bwd_only(mk_ours_enc)
        eb["proposed"] = bwd_only(mk_prop_enc)
        if have_sparsify and name == "top":
            def mk_sp_enc():
                xx, ww, bb = (x_in.clone().requires_grad_(), w_enc.clone().requires_grad_(),
                              b_enc.clone().requires_grad_())
                with ac:
                    vals, _, _ = FusedEncoder.apply(xx, ww, bb, cfg.k, "topk")
                return vals, (xx, ww, bb)

            eb["sparsify fused_encoder"] = bwd_only(mk_sp_enc)
        elif name == "aux":
            eb["sparsify fused_encoder"] = {"note": "sparsify sends no gradient from AuxK into the encoder"}
            if not cuda:
                def mk_dense_aux():
                    xx, ww, bb, wd = (x_in.clone().requires_grad_(), w_enc.clone().requires_grad_(),
                                      b_enc.clone().requires_grad_(), w_dec.clone().requires_grad_())
                    dmat = torch.zeros(cfg.n_tokens, dead_idx.numel(), device=device)
                    loc = torch.searchsorted(dead_idx, idx)
                    dmat.scatter_(1, loc, a)
                    return P.DenseSubsetAux.apply(dmat, xx, ww, bb, wd, dead_idx), (xx, ww, bb, wd)

                eb["proposed dense-subset AuxK (encoder AND decoder backward)"] = bwd_only(mk_dense_aux)

        # --- candidate CPU kernels for the two backward primitives
        if not cuda and args.get("candidates", True):
            cand = res["candidates"][key] = {"gather_dot": {}, "scatter_outer": {}}
            w = torch.randn(idx.shape, generator=g).to(device)
            ref_gd = sr.gather_dot_reference(grad_out, w_dec, idx)
            for cname, fn in [("current: index + bmm (sae_torch reference)", sr.gather_dot_reference),
                              ("aten _embedding_bag_per_sample_weights_backward", P.gather_dot_ebag)]:
                r = run(lambda: fn(grad_out, w_dec, idx))
                r["max_abs_err_vs_current"] = float((fn(grad_out, w_dec, idx) - ref_gd).abs().max())
                cand["gather_dot"][cname] = r
            ref_so = sr.scatter_outer_reference(w, idx, x_in, cfg.num_latents)
            for cname, fn in [("current: sort + CSR[M,N] @ rows (sae_torch reference)", sr.scatter_outer_reference),
                              ("CSR[N,M] by token, no sort, S.t() @ rows", P.scatter_outer_csr_t),
                              ("COO[M,N] torch.sparse.mm", P.scatter_outer_coo),
                              ("aten _embedding_bag_dense_backward", P.scatter_outer_ebag),
                              ("index_add_ of [chunk*k, d] contributions (sparsify's way, chunked)",
                               P.scatter_outer_index_add)]:
                r = run(lambda: fn(w, idx, x_in, cfg.num_latents))
                r["max_abs_err_vs_current"] = float((fn(w, idx, x_in, cfg.num_latents) - ref_so).abs().max())
                cand["scatter_outer"][cname] = r
    return res


# ---------------------------------------------------------------------------------------------------------------


def mode_mlx(args) -> dict:
    from bench.mlx_side import run_mlx

    return run_mlx(args)


MODES = {"time": mode_time, "memory": mode_memory, "kernels": mode_kernels, "mlx": mode_mlx}


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
