"""`sae eval RUN` on torch: how good are the trained coders, on held-out text. The quantities, the options and the
report are framework-free (:mod:`sae_core.evaluation`, which defines each metric); this module runs the model and
the coders."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.data import exclude_mask
from sae_core.errors import UserError
from sae_core.evaluation import CoderTotals, LossTotals, build_report, plan_evaluation, write_report

from .activations import capture, load_model, resolve_device, resolve_dtype
from .sparse_coder import SparseCoder


def _splice(model, hook: str, replace_fn):
    """Forward hook replacing the module's output with replace_fn(input, output)."""
    def hook_fn(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        inp = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
        new = replace_fn(inp, out)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return model.base_model.get_submodule(hook).register_forward_hook(hook_fn, with_kwargs=True)


def _ce_and_logprobs(logits: torch.Tensor, tokens: torch.Tensor):
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, T-1]
    return ce, logprobs


def evaluate(run: str | Path, *, model: str | None = None, dataset: str | None = None, split: str = "test",
             max_tokens: int | None = 32768, batch_size: int | None = None, device: str | None = None,
             dtype: str | None = None, text_column: str | None = None, progress: bool = True,
             write_json: bool = True) -> dict:
    plan = plan_evaluation(run, model=model, dataset=dataset, split=split, max_tokens=max_tokens,
                           batch_size=batch_size, text_column=text_column)
    cfg = plan.cfg
    dev = resolve_device(device or cfg.device)
    lm, tokenizer = load_model(plan.model, dev, resolve_dtype(dtype or cfg.dtype, dev))
    coders = {name: SparseCoder.load_from_disk(folder, dev, dtype=torch.float32)
              for name, folder in plan.coder_dirs.items()}
    hooks = {}
    for name in coders:
        hook = plan.hookpoint(name)
        try:
            lm.base_model.get_submodule(hook)
        except AttributeError:
            raise UserError(f"coder {name}: the model has no module {hook!r}") from None
        hooks[name] = hook
    transcode = {name: c.cfg.transcode for name, c in coders.items()}
    exclude = plan.exclude_tokens(tokenizer)
    chunks = plan.token_chunks(tokenizer)
    bs = plan.batch_size

    totals = {name: CoderTotals(c.num_latents) for name, c in coders.items()}
    clean = LossTotals()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chunks) * cfg.ctx_len, unit="tok", unit_scale=True, desc="Evaluating",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(chunks), bs):
        tokens_np = chunks[start: start + bs]
        tokens = torch.from_numpy(tokens_np.astype(np.int64)).to(dev)
        mask = torch.from_numpy(exclude_mask(tokens_np, exclude)).to(dev)  # [B, T]
        with torch.no_grad():
            with capture(lm, sorted(set(hooks.values())), any(transcode.values()), stop_early=False) as got:
                logits = lm(input_ids=tokens, use_cache=False).logits
            ce_clean, clean_lp = _ce_and_logprobs(logits, tokens)
            clean.add(float(ce_clean.double().sum()), ce_clean.numel())
            for name, sae in coders.items():
                inp, out = got[hooks[name]]
                y = out.flatten(0, 1)[mask.flatten()].float()
                x = inp.flatten(0, 1)[mask.flatten()].float() if transcode[name] else y
                enc = sae.encode(x)
                recon = sae.decode(enc.top_acts, enc.top_indices)
                if sae.W_skip is not None:
                    recon = recon + x @ sae.W_skip.mT
                active = enc.top_acts > 0
                y64 = y.double()
                totals[name].add_sums(float((y64 - recon.double()).pow(2).sum()), y64.sum(0).cpu().numpy(),
                                      float(y64.pow(2).sum()), y.shape[0], float(active.sum()),
                                      enc.top_indices[active].unique().cpu().numpy())

                def spliced(inp_, out_, sae=sae, tc=transcode[name]):
                    source = (inp_ if tc else out_).flatten(0, 1)[mask.flatten()].float()
                    e = sae.encode(source)
                    r = sae.decode(e.top_acts, e.top_indices)
                    if sae.W_skip is not None:
                        r = r + source @ sae.W_skip.mT
                    new = out_.clone()
                    new.view(-1, new.shape[-1])[mask.flatten()] = r.to(new.dtype)
                    return new

                def zeroed(inp_, out_):
                    new = out_.clone()
                    new.view(-1, new.shape[-1])[mask.flatten()] = 0
                    return new

                losses = {}
                for key, fn in (("ce", spliced), ("ce_zero", zeroed)):
                    handle = _splice(lm, hooks[name], fn)
                    try:
                        dirty = lm(input_ids=tokens, use_cache=False).logits
                    finally:
                        handle.remove()
                    ce, lp = _ce_and_logprobs(dirty, tokens)
                    losses[key] = float(ce.double().sum())
                    if key == "ce":
                        losses["kl"] = float((clean_lp.exp() * (clean_lp - lp)).sum(-1).double().sum())
                totals[name].add_losses(losses["ce"], losses["ce_zero"], losses["kl"])
        bar.update(tokens_np.size)
    bar.close()

    report = build_report(plan, chunks, clean, totals, hooks)
    if write_json:
        write_report(plan, report)
    return report
