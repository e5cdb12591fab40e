"""`sae eval RUN`: how good are the trained coders, on held-out text.

Per coder, over the evaluation tokens (excluded tokens such as BOS left out, as in training):
    fvu       sum of squared errors / total variance of the targets, over all evaluation tokens (float64 sums)
    l0        mean number of latents with activation > 0 per token
    dead_pct  % of latents that fire on none of the evaluation tokens
With the coder spliced into the model (the hookpoint module's output replaced by the coder's reconstruction at the
trained-on positions; a transcoder reconstructs the output from the module's input), next-token CE loss over the
evaluation sequences:
    ce_spliced, ce_increase = ce_spliced - ce_clean,
    ce_zero   with the output zeroed at the same positions instead,
    loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)    (1: as good as the clean model, 0: as bad
                                                                       as ablating the hookpoint)
    kl        mean over tokens of KL(clean next-token distribution || spliced one)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.checkpoint import write_text_atomic
from sae_core.data import default_exclude_tokens, exclude_mask, load_token_chunks
from sae_core.errors import UserError
from sae_core.train_config import TrainConfig
from sae_core.training_state import find_coder_dirs, read_run_state

from .activations import capture, load_model, resolve_device, resolve_dtype, run_forward
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
    run = Path(run).expanduser()
    if not run.exists():
        raise UserError(f"run folder {run} not found")
    state = read_run_state(run)
    cfg = TrainConfig.from_dict(state["train_config"]) if state else TrainConfig()
    if state is None and model is None and not (run / "cfg.json").is_file():
        raise UserError(f"{run} holds no state.json (not a run folder of `sae train`); give --model and --dataset")
    dirs = {run.name: run} if (run / "cfg.json").is_file() else find_coder_dirs(run)
    if not dirs:
        raise UserError(f"{run} holds no coder folders (cfg.json + sae.safetensors)")
    if cfg.activations and model is None:
        raise UserError("this run was trained from an activation cache; give --model (and --dataset) to evaluate")
    dev = resolve_device(device or cfg.device)
    lm, tokenizer = load_model(model or cfg.model, dev, resolve_dtype(dtype or cfg.dtype, dev))
    coders = {name: SparseCoder.load_from_disk(folder, dev, dtype=torch.float32) for name, folder in dirs.items()}
    hooks = {}
    for name in coders:
        hook = state["coders"][name]["hookpoint"] if state and name in state.get("coders", {}) else name.split("/")[0]
        try:
            lm.base_model.get_submodule(hook)
        except AttributeError:
            raise UserError(f"coder {name}: the model has no module {hook!r}") from None
        hooks[name] = hook
    transcode = {name: c.cfg.transcode for name, c in coders.items()}
    exclude = default_exclude_tokens(tokenizer) if cfg.exclude_tokens is None else cfg.exclude_tokens
    chunks = load_token_chunks(dataset or cfg.dataset, split, tokenizer, cfg.ctx_len, max_tokens,
                               text_column or cfg.text_column)
    if max_tokens is not None:
        chunks = chunks[: max(1, max_tokens // cfg.ctx_len)]
    bs = batch_size or cfg.batch_size

    sums = {name: {"e2": 0.0, "y": 0.0, "y2": 0.0, "n": 0, "l0": 0.0,
                   "fired": torch.zeros(c.num_latents, dtype=torch.bool, device=dev),
                   "ce": 0.0, "ce_zero": 0.0, "kl": 0.0} for name, c in coders.items()}
    ce_clean_sum, ce_count = 0.0, 0
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
            ce_clean_sum += float(ce_clean.double().sum())
            ce_count += ce_clean.numel()
            for name, sae in coders.items():
                inp, out = got[hooks[name]]
                y = out.flatten(0, 1)[mask.flatten()].float()
                x = inp.flatten(0, 1)[mask.flatten()].float() if transcode[name] else y
                enc = sae.encode(x)
                recon = sae.decode(enc.top_acts, enc.top_indices)
                if sae.W_skip is not None:
                    recon = recon + x @ sae.W_skip.mT
                s = sums[name]
                s["e2"] += float((y - recon).double().pow(2).sum())
                s["y"] = s["y"] + y.double().sum(0)
                s["y2"] += float(y.double().pow(2).sum())
                s["n"] += y.shape[0]
                active = enc.top_acts > 0
                s["l0"] += float(active.sum())
                s["fired"][enc.top_indices[active]] = True

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

                for key, fn in (("ce", spliced), ("ce_zero", zeroed)):
                    handle = _splice(lm, hooks[name], fn)
                    try:
                        dirty = lm(input_ids=tokens, use_cache=False).logits
                    finally:
                        handle.remove()
                    ce, lp = _ce_and_logprobs(dirty, tokens)
                    s[key] += float(ce.double().sum())
                    if key == "ce":
                        s["kl"] += float((clean_lp.exp() * (clean_lp - lp)).sum(-1).double().sum())
        bar.update(tokens_np.size)
    bar.close()

    report = {"run": str(run), "dataset": dataset or cfg.dataset, "split": split, "tokens": int(chunks.size),
              "ce_clean": ce_clean_sum / ce_count, "coders": {}}
    for name, s in sums.items():
        n = max(s["n"], 1)
        mean = s["y"] / n
        total_variance = s["y2"] - n * float((mean * mean).sum())
        ce, ce_zero, ce_clean = s["ce"] / ce_count, s["ce_zero"] / ce_count, report["ce_clean"]
        report["coders"][name] = {
            "hookpoint": hooks[name], "tokens": s["n"],
            "fvu": s["e2"] / total_variance if total_variance > 0 else float("nan"),
            "l0": s["l0"] / n, "dead_pct": 100.0 * float((~s["fired"]).float().mean()),
            "ce_spliced": ce, "ce_zero": ce_zero, "ce_increase": ce - ce_clean,
            "loss_recovered": (ce_zero - ce) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "kl": s["kl"] / ce_count,
        }
    if write_json and run.is_dir() and state is not None:
        write_text_atomic(run / "eval.json", json.dumps(report, indent=1) + "\n")
    return report
