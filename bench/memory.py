"""Peak-memory measurement of one training step.

CPU, two measures, both taken in a fresh worker process per side (so nothing of another side's heap is reused):

* ``tensor``: exact accounting of torch's CPU allocator. The step runs under ``torch.profiler`` with
  ``profile_memory=True``; every allocation and free of a tensor's storage is an event with a size and a time.
  Their running sum from the start of the step is the step's live tensor memory above what was alive before it
  (parameters, optimizer moments, the batch); its maximum is the peak. It sees every tensor temporary, e.g. the
  [N, k, d_in] contributions in sparsify's encoder backward and every dense [N, M] tensor, also those made inside
  autograd. It does not see memory that a library allocates outside torch's allocator (MKL/oneDNN workspaces).
  The live bytes at the start of ``backward()`` are reported too: what the forward keeps for the backward.
* ``rss``: ``ru_maxrss`` (the process's resident high-water mark) after the step minus the resident size just
  before it (after ``malloc_trim``), for everything, torch or not. Coarser (page granularity, allocator reuse).

CUDA: ``torch.cuda.max_memory_allocated()`` over the step minus ``memory_allocated()`` before it (exact, torch's
caching allocator).
"""
from __future__ import annotations

import ctypes
import gc
import resource
import time


def malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def profile_step_cpu(step) -> dict:
    """Run `step(marks)` under the profiler; return the tensor-allocator peak above the start and the live bytes at
    each phase mark (marks: dict filled by the step with time.time_ns() at 'forward', 'backward', ...)."""
    from torch.profiler import ProfilerActivity, profile

    marks: dict[str, int] = {}
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.time_ns()
        step(marks)
        t1 = time.time_ns()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and t0 <= e.start_ns() <= t1)
    cur = peak = 0
    at_mark = {}
    phase_peak = {}
    bounds = sorted(marks.items(), key=lambda kv: kv[1])
    bi = 0
    current_phase = None
    for ts, nb in events:
        while bi < len(bounds) and bounds[bi][1] <= ts:
            at_mark[bounds[bi][0]] = cur
            current_phase = bounds[bi][0]
            bi += 1
        cur += nb
        peak = max(peak, cur)
        if current_phase is not None:
            phase_peak[current_phase] = max(phase_peak.get(current_phase, cur), cur)
    while bi < len(bounds):
        at_mark[bounds[bi][0]] = cur
        bi += 1
    return {"peak_bytes": peak, "live_at_phase_start_bytes": at_mark, "phase_peak_bytes": phase_peak,
            "end_bytes": cur, "n_events": len(events)}


def rss_step_cpu(step, n_steps: int) -> dict:
    gc.collect()
    malloc_trim()
    before = current_rss_bytes()
    hw_before = max_rss_bytes()
    for _ in range(n_steps):
        step(None)
    after_hw = max_rss_bytes()
    return {"rss_before_bytes": before, "maxrss_after_bytes": after_hw, "maxrss_before_bytes": hw_before,
            "peak_delta_bytes": max(0, after_hw - before), "steps": n_steps,
            "note": "" if after_hw > hw_before else "the high-water mark was set before the step (setup)"}


def cuda_step(step) -> dict:
    import torch

    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    marks: dict[str, int] = {}
    step(marks)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak - base, "base_bytes": base, "peak_abs_bytes": peak}


def mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20
