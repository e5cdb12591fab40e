"""Markdown rendering of bench results (the JSON is the record; this is the table for people)."""
from __future__ import annotations

from bench.common import SIDE_LABELS

MEMORY_METHOD_CPU = (
    "Peak memory (CPU), each side in a fresh worker process, one step after a first (warm) step: "
    "**tensor** = peak of torch's CPU-allocator live bytes during the step above what was alive before it "
    "(parameters, optimizer moments, the batch), from the allocation/free events that `torch.profiler` "
    "(`profile_memory=True`) records, so every temporary counts (sparsify's [N, k, d_in] encoder-backward "
    "contributions, every dense [N, M] tensor, gradients); **at bwd** = tensor bytes alive when `backward()` starts "
    "(what the forward keeps for the backward, plus the loss graph); **RSS** = `ru_maxrss` after the step minus the "
    "resident size just before it (after `malloc_trim`), i.e. everything including non-torch allocations, at page "
    "granularity. Ratios are ours / sparsify.")
MEMORY_METHOD_CUDA = ("Peak memory (CUDA): `torch.cuda.max_memory_allocated()` during one step minus "
                      "`memory_allocated()` before it, each side in a fresh worker process.")


def _mb(b):
    return None if b is None else b / 2**20


def _fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _side_memory(entry_mem: dict | None, cuda: bool) -> dict:
    if not entry_mem or not entry_mem.get("ok"):
        return {}
    if cuda:
        return {"tensor": entry_mem["cuda"]["peak_bytes"]}
    t, r = entry_mem["tensor"], entry_mem["rss"]
    return {"tensor": t["peak_bytes"], "at_bwd": t["live_at_phase_start_bytes"].get("backward"),
            "rss": r["peak_delta_bytes"], "fwd_peak": t["phase_peak_bytes"].get("forward"),
            "bwd_peak": t["phase_peak_bytes"].get("backward")}


def markdown(results: dict, target: dict) -> str:
    env = results["environment"]
    cuda = env["device"].startswith("cuda")
    L = []
    L.append("# sae_torch vs sparsify: training-step benchmark\n")
    dev = env.get("gpu") if cuda else f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, torch threads " \
                                         f"{env['torch_threads']})"
    L.append(f"- **Device**: {dev}  ")
    L.append(f"- **Date**: {env['date_utc']}; load average (1, 5, 15 min) at start "
             f"{env.get('load_average_at_start')}, at end {env.get('load_average_at_end', 'n/a')} "
             f"(other processes share the CPU when it exceeds the core count)  ")
    L.append(f"- **Versions**: torch {env['torch']}, eai-sparsify {env.get('eai_sparsify') or 'not installed'}, "
             f"mlx {env.get('mlx') or 'not installed'}, triton {env.get('triton') or 'not installed'}, "
             f"Python {env['python']}  ")
    s = results["settings"]
    L.append(f"- **Step**: forward + backward + optimizer step (signum, identical for all torch sides) + decoder "
             f"projection/renormalisation; AuxK on (auxk_alpha 1/32, dead mask = seeded random subset); "
             f"{'bf16 autocast' if cuda else 'fp32'}; {s['warmup']} warm-up step(s), median of {s['reps']} timed "
             f"steps; torch sides interleaved in one process (rotating order)  ")
    if s.get("worker_env"):
        L.append(f"- **Worker environment** (same for every side): "
                 f"{', '.join(f'{k}={v}' for k, v in s['worker_env'].items())}  ")
    if s.get("quick"):
        L.append("- **--quick run: a tiny config to check that everything runs; the numbers mean nothing.**  ")
    for n in results["notes"]:
        L.append(f"- Note: {n}  ")
    L.append("")

    L.append("## Training step\n")
    L.append("| config | side | step s (median) | tokens/s | speed x sparsify | peak MB | mem x sparsify | "
             + ("" if cuda else "at bwd MB | RSS MB | RSS x sparsify | ") + "step / GEMM |")
    L.append("|---|---|---|---|---|---|---|" + ("" if cuda else "---|---|---|") + "---|")
    target_rows = {}
    first_losses = []
    for e in results["configs"]:
        c = e["config"]
        cname = f"d_in={c['d_in']} M={c['num_latents']} k={c['k']} N={c['n_tokens']} dead={c['num_dead']}"
        t = e.get("time")
        if t is None:  # --profile-only
            L.append(f"| {cname} | all | not timed (--profile-only; see profile.txt) |")
            continue
        if not t.get("ok"):
            L.append(f"| {cname} | all | failed: {t.get('error')} |")
            continue
        sides = t["sides"]
        gemm = t.get("gemm", {}).get("median_s")
        mem = {sd: _side_memory((e.get("memory") or {}).get(sd), cuda) for sd in sides}
        sp_t = sides.get("sparsify", {}).get("median_s")
        sp_m = mem.get("sparsify", {})
        for sd, v in sides.items():
            m = mem.get(sd, {})
            tps = c["n_tokens"] / v["median_s"]
            speed = _ratio(sp_t, v["median_s"])
            mem_r = _ratio(m.get("tensor"), sp_m.get("tensor"))
            rss_r = _ratio(m.get("rss"), sp_m.get("rss"))
            row = (f"| {cname} | {SIDE_LABELS.get(sd, sd)} | {v['median_s']:.3f} | {tps:,.0f} | "
                   f"{_fmt(speed)} | {_fmt(_mb(m.get('tensor')), '.0f')} | {_fmt(mem_r)} | ")
            if not cuda:
                row += f"{_fmt(_mb(m.get('at_bwd')), '.0f')} | {_fmt(_mb(m.get('rss')), '.0f')} | {_fmt(rss_r)} | "
            row += f"{_fmt(_ratio(v['median_s'], gemm), '.1f')} |"
            L.append(row)
            if c["d_in"] == target["d_in"] and c["k"] == target["k"]:
                target_rows[sd] = (speed, mem_r, rss_r)
        mx = e.get("mlx")
        variants = [("", mx)] + [(f", kernels {name}" + ("" if isinstance(r.get("kernels"), dict) else
                                                          f" asked, {r.get('kernels')} ran"), r)
                                 for name, r in (e.get("mlx_variants") or {}).items()]
        for how, mx_run in variants if mx is not None else []:
            if mx_run.get("ok") and "time" in mx_run:
                v = mx_run["time"]["median_s"]
                n = len(mx_run["time"]["times_s"])
                L.append(f"| {cname} | {SIDE_LABELS['mlx']}{how} (own process, {mx_run.get('warmup', '?')} warm-up "
                         f"+ {n} step{'s' if n > 1 else ''}; {mx_run.get('blas_short', '')}) | {v:.3f} | "
                         f"{c['n_tokens'] / v:,.0f} | {_fmt(_ratio(sp_t, v))} | "
                         f"{_fmt(_mb(mx_run['memory']['peak_bytes']), '.0f')} (MLX allocator) | "
                         f"{_fmt(_ratio(mx_run['memory']['peak_bytes'], sp_m.get('tensor')))} | "
                         + ("" if cuda else "n/a | n/a | n/a | ") + f"{_fmt(_ratio(v, gemm), '.1f')} |")
            else:
                why = mx_run.get("skipped") or mx_run.get("error")
                L.append(f"| {cname} | {SIDE_LABELS['mlx']}{how} | skipped: {why} |")
        losses = ", ".join(f"{sd} {v['losses'][0]:.6g}" for sd, v in sides.items() if v.get("losses"))
        if mx is not None and mx.get("losses"):
            losses += f", mlx {mx['losses'][0]:.6g}"
        first_losses.append(f"{cname}: {losses}")
        if gemm:
            L.append(f"| {cname} | dense encoder GEMM alone ({t['gemm']['dtype']}) | {gemm:.3f} | "
                     f"{c['n_tokens'] / gemm:,.0f} | | | |" + ("" if cuda else " | | |") + " 1.0 |")
    L.append("")
    L.append("speed x sparsify = sparsify's step time / this side's (tokens/s ratio, > 1 is faster); "
             "mem x sparsify = this side's peak / sparsify's (< 1 is smaller); step / GEMM = step time / the dense "
             "encoder GEMM's time " + ("(bf16: the physical floor)." if cuda else "(fp32, the CPU step's precision)."))
    L.append("")
    L.append("First-step loss of each side (same parameters and data, so these agree up to rounding and the "
             "choice among tied latents): " + "; ".join(first_losses) + ".")
    L.append("")
    L.append(MEMORY_METHOD_CUDA if cuda else MEMORY_METHOD_CPU)
    L.append("")

    if target_rows and "sparsify" in target_rows:
        L.append(f"## Targets at d_in={target['d_in']}, k={target['k']} "
                 f"(speed >= {target['speed_ratio_min']}x sparsify, peak memory <= {target['memory_ratio_max']}x)\n")
        for sd, (speed, mem_r, rss_r) in target_rows.items():
            if sd == "sparsify":
                continue
            ok_s = speed is not None and speed >= target["speed_ratio_min"]
            ok_m = mem_r is not None and mem_r <= target["memory_ratio_max"]
            L.append(f"- {SIDE_LABELS.get(sd, sd)}: speed {_fmt(speed)}x ({'met' if ok_s else 'MISSED'}), "
                     f"peak tensor memory {_fmt(mem_r)}x ({'met' if ok_m else 'MISSED'}), RSS {_fmt(rss_r)}x")
        L.append("")

    if results.get("memory_auxk_off"):
        L.append("## Peak memory, AuxK on vs off (same config otherwise)\n")
        on = {}
        for e in results["configs"]:
            c = e["config"]
            for sd, m in (e.get("memory") or {}).items():
                on[(c["d_in"], c["k"], sd)] = _side_memory(m, cuda)
        if cuda:
            L.append("| config | side | peak MB, AuxK on | peak MB, AuxK off |")
            L.append("|---|---|---|---|")
        else:
            L.append("| config | side | peak MB on | peak MB off | forward / backward peak MB on | "
                     "forward / backward peak MB off | at bwd MB on | at bwd MB off | RSS MB on | RSS MB off |")
            L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["memory_auxk_off"]:
            c = r["config"]
            off = _side_memory(r["memory"], cuda)
            o = on.get((c["d_in"], c["k"], r["side"]), {})
            name = f"d_in={c['d_in']} k={c['k']}"
            if cuda:
                L.append(f"| {name} | {SIDE_LABELS.get(r['side'], r['side'])} | {_fmt(_mb(o.get('tensor')), '.0f')}"
                         f" | {_fmt(_mb(off.get('tensor')), '.0f')} |")
            else:
                L.append(f"| {name} | {SIDE_LABELS.get(r['side'], r['side'])} | "
                         f"{_fmt(_mb(o.get('tensor')), '.0f')} | {_fmt(_mb(off.get('tensor')), '.0f')} | "
                         f"{_fmt(_mb(o.get('fwd_peak')), '.0f')} / {_fmt(_mb(o.get('bwd_peak')), '.0f')} | "
                         f"{_fmt(_mb(off.get('fwd_peak')), '.0f')} / {_fmt(_mb(off.get('bwd_peak')), '.0f')} | "
                         f"{_fmt(_mb(o.get('at_bwd')), '.0f')} | {_fmt(_mb(off.get('at_bwd')), '.0f')} | "
                         f"{_fmt(_mb(o.get('rss')), '.0f')} | {_fmt(_mb(off.get('rss')), '.0f')} |")
        c = results["memory_auxk_off"][0]["config"]
        dense = c["n_tokens"] * c["num_latents"] * 4 / 2**20
        L.append("")
        L.append(f"For scale: one dense fp32 [N, M] tensor is {dense:.0f} MB here (N={c['n_tokens']}, "
                 f"M={c['num_latents']}); every side's forward holds at least one (the encoder GEMM's output). "
                 "'at bwd' is what survives the forward into the backward; forward / backward peak = the highest "
                 "live tensor bytes while that phase runs (the backward's includes the parameter gradients).")
        L.append("")

    k = results.get("kernels")
    if k:
        L.append(f"## Kernel micro-benchmarks ({k['config']['name']}; median ms)\n")
        if not k.get("ok"):
            L.append(f"failed: {k.get('error')}\n")
        else:
            for group, title in [("decode_forward", "decode forward"), ("decode_backward",
                                  "decode backward (d_acts and d_W_dec)"),
                                 ("encoder_backward", "encoder backward (d_x, d_W_enc, d_b_enc) of the selected "
                                                      "latents"),
                                 ("auxk_backward", "the whole AuxK backward (d_x, d_W_enc, d_b_enc, d_W_dec), by "
                                                   "path")]:
                if not k.get(group):  # auxk_backward: none with AuxK off, nor in results of older versions
                    continue
                L.append(f"**{title}**\n")
                L.append("| index set | implementation | ms |")
                L.append("|---|---|---|")
                for key, impls in k[group].items():
                    for impl, r in impls.items():
                        v = f"{r['median_s'] * 1e3:.1f}" if "median_s" in r else r.get("note", "")
                        L.append(f"| {key} | {impl} | {v} |")
                L.append("")
            if k.get("auxk_path"):
                L.append(f"{k['auxk_path']}.\n")
            if k.get("candidates"):
                L.append("**CPU alternatives for the two backward primitives** (`--candidates`, bench/candidates.py; "
                         "same inputs; max abs error against sae_torch's current `gather_dot_reference` / "
                         "`scatter_outer_reference`, both aten embedding_bag backward ops)\n")
                L.append("| index set | primitive | implementation | ms | max abs err |")
                L.append("|---|---|---|---|---|")
                for key, prims in k["candidates"].items():
                    for prim, impls in prims.items():
                        for impl, r in impls.items():
                            L.append(f"| {key} | {prim} | {impl} | {r['median_s'] * 1e3:.1f} | "
                                     f"{r['max_abs_err_vs_current']:.1e} |")
                L.append("")
    L.append(f"Total wall time of the run: {results.get('total_wall_s', 0):.0f} s.")
    return "\n".join(L) + "\n"
