"""`sae eval RUN` on MLX (what `--backend auto` picks on a Mac): the same report as `sae_torch.eval`, with the
language model run by mlx-lm and the coders by `sae_mlx`. The quantities, the options and the report are
framework-free (:mod:`sae_core.evaluation`, which defines each metric); this module runs the model and the coders.

The coder is spliced in by swapping the hookpoint module for a wrapper that calls it and replaces its output at the
evaluated positions (the same positions `sae_torch.eval` replaces), as the activation capture swaps modules.
"""
from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from sae_core.data import exclude_mask
from sae_core.errors import UserError
from sae_core.evaluation import CoderTotals, LossTotals, build_report, plan_evaluation, write_report

from .activations import (_get, _Hook, _set, base_model, capture, has_mlx_lm, load_model, resolve_device,
                          resolve_dtype, to_numpy)
from .sparse_coder import SparseCoder


class _Replace(_Hook):
    """Stands in for a module during a forward: returns replace_fn(input, output) in place of its output."""

    def __call__(self, *args, **kwargs):
        output = self["inner"](*args, **kwargs)
        out = output[0] if isinstance(output, tuple) else output
        inp = args[0] if args else next((v for v in kwargs.values() if isinstance(v, mx.array)), None)
        new = self._record(inp, out)  # _Hook keeps the function as _record
        return (new, *output[1:]) if isinstance(output, tuple) else new


def _forward_with(model: nn.Module, hook: str, replace_fn, tokens: mx.array) -> mx.array:
    base = base_model(model)
    original = _get(base, hook)
    _set(base, hook, _Replace(original, replace_fn))
    try:
        return model(tokens)
    finally:
        _set(base, hook, original)


def _ce_and_logprobs(logits: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
    logits = logits[:, :-1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ce = -mx.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1).squeeze(-1)  # [B, T-1]
    return ce, logprobs


def _reconstruct(sae: SparseCoder, source: mx.array):
    enc = sae.encode(source)
    recon = sae.decode(enc.top_acts, enc.top_indices)
    if sae.W_skip is not None:
        recon = recon + source @ sae.W_skip.T
    return enc, recon


def _replace_rows(out: mx.array, rows: mx.array, values) -> mx.array:
    """`out` [B, T, d] with the flat positions `rows` set to `values` ([len(rows), d] or a scalar)."""
    flat = out.reshape(-1, out.shape[-1])
    flat[rows] = values.astype(out.dtype) if isinstance(values, mx.array) else values
    return flat.reshape(out.shape)


def evaluate(run: str | Path, *, model: str | None = None, dataset: str | None = None, split: str = "test",
             max_tokens: int | None = 32768, batch_size: int | None = None, device: str | None = None,
             dtype: str | None = None, text_column: str | None = None, progress: bool = True,
             write_json: bool = True) -> dict:
    """The MLX twin of `sae_torch.eval.evaluate` (same arguments, same report); the model runs in mlx-lm."""
    if not has_mlx_lm():
        raise UserError("`sae eval` on the MLX backend runs the model in mlx-lm: pip install mlx-lm "
                        "(or evaluate with --backend torch)")
    plan = plan_evaluation(run, model=model, dataset=dataset, split=split, max_tokens=max_tokens,
                           batch_size=batch_size, text_column=text_column)
    with mx.stream(resolve_device(device or plan.cfg.device)):
        report = _evaluate(plan, dtype, progress)
    if write_json:
        write_report(plan, report)
    return report


def _evaluate(plan, dtype: str | None, progress: bool) -> dict:
    cfg = plan.cfg
    lm, tokenizer = load_model(plan.model, resolve_dtype(dtype or cfg.dtype))
    coders = {name: SparseCoder.load_from_disk(folder, dtype=mx.float32) for name, folder in plan.coder_dirs.items()}
    hooks = {}
    for name in coders:
        hook = plan.hookpoint(name)
        try:
            _get(base_model(lm), hook)
        except (KeyError, IndexError, ValueError, AttributeError):
            raise UserError(f"coder {name}: the model has no module {hook!r}") from None
        hooks[name] = hook
    transcode = {name: c.cfg.transcode for name, c in coders.items()}
    exclude = plan.exclude_tokens(tokenizer)
    chunks = plan.token_chunks(tokenizer)

    totals = {name: CoderTotals(c.num_latents) for name, c in coders.items()}
    clean = LossTotals()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chunks) * cfg.ctx_len, unit="tok", unit_scale=True, desc="Evaluating",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(chunks), plan.batch_size):
        tokens_np = chunks[start: start + plan.batch_size]
        tokens = mx.array(tokens_np.astype(np.int32))
        rows = mx.array(np.flatnonzero(exclude_mask(tokens_np, exclude).reshape(-1)).astype(np.int32))
        with capture(lm, sorted(set(hooks.values())), any(transcode.values()), stop_early=False) as got:
            logits = lm(tokens)
        ce_clean, clean_lp = _ce_and_logprobs(logits, tokens)
        mx.eval(ce_clean, clean_lp, [a for pair in got.values() for a in pair if a is not None])
        clean.add(float(np.asarray(ce_clean, dtype=np.float64).sum()), ce_clean.size)
        for name, sae in coders.items():
            inp, out = got[hooks[name]]
            y = out.reshape(-1, out.shape[-1])[rows].astype(mx.float32)
            x = inp.reshape(-1, inp.shape[-1])[rows].astype(mx.float32) if transcode[name] else y
            enc, recon = _reconstruct(sae, x)
            mx.eval(enc.top_acts, enc.top_indices, recon)
            totals[name].add_reconstruction(to_numpy(y), to_numpy(recon), to_numpy(enc.top_acts),
                                            to_numpy(enc.top_indices))

            def spliced(inp_, out_, sae=sae, tc=transcode[name]):
                source = inp_ if tc else out_
                source = source.reshape(-1, source.shape[-1])[rows].astype(mx.float32)
                return _replace_rows(out_, rows, _reconstruct(sae, source)[1])

            def zeroed(inp_, out_):
                return _replace_rows(out_, rows, 0.0)

            ce, lp = _ce_and_logprobs(_forward_with(lm, hooks[name], spliced, tokens), tokens)
            kl = (mx.exp(clean_lp) * (clean_lp - lp)).sum(axis=-1)
            ce_zero, _ = _ce_and_logprobs(_forward_with(lm, hooks[name], zeroed, tokens), tokens)
            mx.eval(ce, kl, ce_zero)
            totals[name].add_losses(float(np.asarray(ce, dtype=np.float64).sum()),
                                    float(np.asarray(ce_zero, dtype=np.float64).sum()),
                                    float(np.asarray(kl, dtype=np.float64).sum()))
        bar.update(tokens_np.size)
    bar.close()
    return build_report(plan, chunks, clean, totals, hooks)
