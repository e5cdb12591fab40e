"""SAELens's on-disk format, read and written with NumPy only (no torch, no sae_lens import).

Converts our coders to SAELens folders and back (bit-exact for TopK autoencoders; TopK transcoders under their own
architecture names), refuses what SAELens cannot express, and maps hook names between the two vocabularies.
Checked against sae-lens 6.54.12; the format, forward pass and every mapping are in docs/convert.md
("The SAELens format, in detail").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import reference
from .checkpoint import FLOAT_DTYPES, load_safetensors_numpy, read_header, save_safetensors_numpy, write_text_atomic
from .config import SparseCoderConfig
from .errors import CheckpointError, UserError

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the sae-lens release whose source and loader this module was checked against

TOPK = "topk"
TOPK_TRANSCODER = "topk_transcoder"
TOPK_SKIP_TRANSCODER = "topk_skip_transcoder"
SUPPORTED = (TOPK, TOPK_TRANSCODER, TOPK_SKIP_TRANSCODER)

# Why each SAELens architecture we cannot represent is refused.
REFUSED = {
    "standard": "a ReLU SAE (every latent with a positive pre-activation fires, no k); ours are TopK only",
    "jumprelu": "a JumpReLU SAE (per-latent thresholds); ours are TopK and have no thresholds",
    "gated": "a gated SAE (separate gate and magnitude paths); ours are TopK only",
    "abstopk": ("an AbsTopK SAE (selects by |pre-activation| and keeps negative values); "
                "ours select by value after ReLU"),
    "batchtopk": "a BatchTopK SAE (selection across the batch; SAELens saves it for inference as 'jumprelu')",
    "matryoshka_batchtopk": "a Matryoshka BatchTopK SAE (selection across the batch)",
    "transcoder": ("SAELens's ReLU transcoder (every latent with a positive pre-activation fires, no k); ours are "
                   "TopK transcoders"),
    "skip_transcoder": ("SAELens's ReLU skip transcoder (every latent with a positive pre-activation fires, no k); "
                        "ours are TopK transcoders"),
    "jumprelu_transcoder": "a JumpReLU transcoder (per-latent thresholds); ours are TopK and have no thresholds",
    "jumprelu_skip_transcoder": "a JumpReLU skip transcoder (per-latent thresholds); ours are TopK",
    "temporal": "a temporal SAE (attends over earlier tokens); ours encode each token on its own",
    "matching_pursuit": "a matching-pursuit SAE (iterative residual encoding); ours are TopK",
}


@dataclass
class SaeLensCheckpoint:
    """A validated SAELens folder: its config (normalised to 6.x fields) and its tensors, as stored."""
    folder: Path
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    k: int
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool
    reshape_activations: str
    metadata: dict
    tensors: dict[str, np.ndarray]
    raw_cfg: dict = field(repr=False, default_factory=dict)

    @property
    def skip(self) -> bool:
        return "W_skip" in self.tensors


def _bool(cfg: dict, key: str, default: bool, where: str) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _positive_int(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _normalise_config(raw: dict, where: str) -> dict:
    """SAELens's own pre-6.0 mapping (handle_pre_6_0_config), limited to the fields that matter here."""
    cfg = dict(raw)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    major = _major(cfg.get("sae_lens_version") or metadata.get("sae_lens_version"))
    if major is not None and major >= 6:
        return cfg
    # pre-6.0: flat fields, architecture defaults to "standard", topk from activation_fn(_str) + activation_fn_kwargs
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    cfg = {renames.get(key, key): value for key, value in cfg.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk":
        if not isinstance(kwargs, dict) or kwargs.get("k") is None:
            raise CheckpointError(f"{where}: activation_fn is 'topk' but activation_fn_kwargs has no 'k'")
        cfg["architecture"] = TOPK
        cfg["k"] = kwargs["k"]
    elif cfg["architecture"] == TOPK and cfg.get("k") is None and isinstance(kwargs, dict) and "k" in kwargs:
        cfg["k"] = kwargs["k"]
    elif cfg.get("activation_fn") not in (None, "relu") and cfg["architecture"] == "standard":
        raise CheckpointError(f"{where}: activation_fn {cfg.get('activation_fn')!r} is not supported "
                              f"(only topk SAEs convert)")
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    meta = dict(metadata)
    for key in ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "prepend_bos"):
        if key in cfg and key not in meta:
            meta[key] = cfg[key]
    cfg["metadata"] = meta
    return cfg


def read_saelens(folder: Path) -> SaeLensCheckpoint:
    """Read and validate a SAELens folder; refuse, naming the reason, whatever ours cannot compute the same way."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; a SAELens folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
        assert isinstance(raw, dict)
    except (ValueError, AssertionError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{cfg_path}: not a JSON object") from None
    where = str(cfg_path)
    cfg = _normalise_config(raw, where)
    arch = cfg.get("architecture")
    if arch in REFUSED:
        raise UserError(f"{folder}: cannot convert SAELens architecture {arch!r}: it is {REFUSED[arch]}")
    if arch not in SUPPORTED:
        raise UserError(f"{folder}: cannot convert SAELens architecture {arch!r} (supported: {', '.join(SUPPORTED)})")

    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        hint = {
            "expected_average_only_in": ("its inputs must be multiplied by a scaling factor that cfg.json does not "
                                         "store; fold it first with SAELens (sae.fold_activation_norm_scaling_factor"
                                         "(factor), then sae.cfg.normalize_activations = 'none' and save_model)"),
            "covariance_whitening": ("its inputs must be whitened with statistics that cfg.json does not store; fold "
                                     "them first with SAELens's sae.fold_activation_whitening(...)"),
            "constant_norm_rescale": "it rescales every input to norm sqrt(d_in) at run time, which ours cannot do",
            "layer_norm": "it layer-normalises every input at run time, which ours cannot do",
        }.get(norm, "ours has no input normalisation")
        raise UserError(f"{folder}: cannot convert normalize_activations={norm!r}: {hint}")

    d_in = _positive_int(cfg, "d_in", where)
    d_sae = _positive_int(cfg, "d_sae", where)
    transcoder = arch != TOPK
    d_out = _positive_int(cfg, "d_out", where) if transcoder else d_in
    k = _positive_int(cfg, "k", where)
    if k > d_sae:
        raise CheckpointError(f"{where}: k={k} is larger than d_sae={d_sae}")
    apply_b_dec = _bool(cfg, "apply_b_dec_to_input", not transcoder, where)
    if transcoder and apply_b_dec:
        raise CheckpointError(f"{where}: apply_b_dec_to_input is true, which SAELens does not allow for transcoders")
    rescale = _bool(cfg, "rescale_acts_by_decoder_norm", False, where) if not transcoder else False
    reshape = cfg.get("reshape_activations", "none") or "none"
    if reshape not in ("none", "hook_z"):
        raise UserError(f"{folder}: cannot convert reshape_activations={reshape!r} (only 'none' and 'hook_z')")

    header, _ = read_header(weights_path)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if arch == TOPK_SKIP_TRANSCODER:
        expected["W_skip"] = (d_out, d_in)
    names = set(header)
    if "scaling_factor" in names:
        names.discard("scaling_factor")
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing:
        raise CheckpointError(f"{weights_path}: missing tensor(s) {', '.join(missing)} required by SAELens "
                              f"architecture {arch!r}")
    if extra:
        raise UserError(f"{weights_path}: unexpected tensor(s) {', '.join(extra)} for SAELens architecture {arch!r}; "
                        f"converting would drop them")
    for name, shape in expected.items():
        got = tuple(header[name]["shape"])
        if got != shape:
            hint = " (transposed? SAELens stores W_dec as [d_sae, d_out])" if got == shape[::-1] else ""
            raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {got}, but {CONFIG_FILE} (d_in={d_in}, "
                                  f"d_sae={d_sae}, d_out={d_out}) implies {shape}{hint}")
        if header[name]["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{weights_path}: tensor {name!r} has dtype {header[name]['dtype']}, "
                                  f"expected a float type")
    tensors, _ = load_safetensors_numpy(weights_path)
    for name, value in tensors.items():
        if not np.isfinite(value.astype(np.float32)).all():
            raise CheckpointError(f"{weights_path}: tensor {name!r} contains NaN or Inf values; this checkpoint "
                                  f"is corrupt")
    if "scaling_factor" in tensors:
        factor = tensors.pop("scaling_factor")
        if not np.all(factor.astype(np.float64) == 1.0):
            raise UserError(f"{weights_path}: a finetuning scaling_factor that is not all ones (an old SAELens "
                            f"fine-tuning option); load and re-save it with a current SAELens first")
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return SaeLensCheckpoint(folder, arch, d_in, d_sae, d_out, k, apply_b_dec, rescale, reshape, dict(metadata),
                             tensors, raw)


# ---- the two directions ----

def saelens_to_ours(ck: SaeLensCheckpoint) -> tuple[SparseCoderConfig, int, int, dict[str, np.ndarray], dict]:
    """(config, d_in, d_out, tensors in our names (float64 where folding computed them), extra cfg.json keys)."""
    transcode = ck.architecture != TOPK
    t = ck.tensors
    w_enc = t["W_enc"]  # [d_in, d_sae]
    b_enc = t["b_enc"]
    w_dec = t["W_dec"]
    b_dec = t["b_dec"]
    notes = []
    if ck.rescale_acts_by_decoder_norm:
        norms = np.linalg.norm(w_dec.astype(np.float64), axis=1)
        if (norms == 0).any():
            raise UserError(f"{ck.folder}: rescale_acts_by_decoder_norm is true but decoder row(s) "
                            f"{np.flatnonzero(norms == 0)[:5].tolist()} have norm 0 (SAELens divides by it)")
        w_enc = w_enc.astype(np.float64) * norms[None, :]
        b_enc = b_enc.astype(np.float64) * norms
        w_dec = w_dec.astype(np.float64) / norms[:, None]
        notes.append("folded rescale_acts_by_decoder_norm (decoder row norms) into W_enc and b_enc")
    if not transcode and not ck.apply_b_dec_to_input:
        # ours subtracts b_dec before encoding: (x - b_dec) @ W + b_enc + b_dec @ W == x @ W + b_enc
        b_enc = b_enc.astype(np.float64) + b_dec.astype(np.float64) @ w_enc.astype(np.float64)
        notes.append("folded apply_b_dec_to_input=false into b_enc (ours always subtracts b_dec)")
    tensors = {"encoder.weight": np.ascontiguousarray(np.swapaxes(w_enc, 0, 1)), "encoder.bias": b_enc,
               "W_dec": w_dec, "b_dec": b_dec}
    if ck.skip:
        tensors["W_skip"] = t["W_skip"]

    saved = ck.metadata.get("sparsify") if isinstance(ck.metadata.get("sparsify"), dict) else {}
    known = SparseCoderConfig().to_dict()
    cfg = SparseCoderConfig.from_dict({key: saved[key] for key in known if key in saved})
    cfg.activation = "topk"
    cfg.k = ck.k
    cfg.transcode = transcode
    cfg.skip_connection = ck.skip
    if cfg.num_latents_for(ck.d_in) != ck.d_sae:
        cfg.num_latents = ck.d_sae
        if ck.d_sae % ck.d_in == 0:
            cfg.expansion_factor = ck.d_sae // ck.d_in
    if "normalize_decoder" not in saved:
        norms = np.linalg.norm(tensors["W_dec"].astype(np.float64), axis=1)
        cfg.normalize_decoder = bool(np.allclose(norms, 1.0, atol=1e-2))
    cfg.validate(ck.d_in, ck.d_out, where=str(ck.folder))
    extra = {"saelens": {"architecture": ck.architecture, "metadata": ck.metadata,
                         "reshape_activations": ck.reshape_activations}}
    if notes:
        extra["saelens"]["conversion_notes"] = notes
    return cfg, ck.d_in, ck.d_out, tensors, extra


def _major(version) -> int | None:
    match = re.match(r"\d+", version) if isinstance(version, str) else None
    return int(match.group()) if match else None


# ---- hook names: sparsify's module paths <-> TransformerLens's hook names ----

# A sparsify hookpoint is a module path inside the HF base model: `layers.N` (Llama, Qwen, Gemma, Mistral, SmolLM,
# Pythia), `h.N` (GPT-2), with `.mlp` or the attention module (`self_attn`, `attn`, `attention`) below it. An
# autoencoder reads the module's output; a transcoder reads its input and predicts its output.
_LAYER_PATH = re.compile(r"(?:model\.|transformer\.|gpt_neox\.)?(?P<stack>layers|h)[._](?P<n>\d+)"
                         r"(?:\.(?P<sub>mlp|self_attn|attn|attention))?")
_EMBEDDINGS = ("embed_tokens", "model.embed_tokens", "wte", "transformer.wte", "embed_in", "gpt_neox.embed_in")
NORM_CAVEAT = ("TransformerLens's {hook} is the normalised input before the {norm} norm's own weight (and bias) "
               "are applied, but the transcoder was trained on the module's actual input, after them: at that hook "
               "it is exact only where that weight is all ones (and the bias zero); otherwise fold them into W_enc "
               "and b_enc (and W_skip) first")


def transformer_lens_hooks(hookpoint: str, transcode: bool) -> tuple[str, str | None, str | None] | None:
    """(hook_name, hook_name_out or None, caveat or None) in TransformerLens's vocabulary for a sparsify hookpoint;
    None where TransformerLens has no hook for it. Autoencoders: layers.N -> blocks.N.hook_resid_post, layers.N.mlp
    -> blocks.N.hook_mlp_out, layers.N.self_attn -> blocks.N.hook_attn_out, embed_tokens -> hook_embed.
    Transcoders (input -> output): layers.N -> hook_resid_pre -> hook_resid_post, layers.N.mlp ->
    ln2.hook_normalized -> hook_mlp_out, layers.N.self_attn -> ln1.hook_normalized -> hook_attn_out."""
    if hookpoint in _EMBEDDINGS:
        return None if transcode else ("hook_embed", None, None)
    match = _LAYER_PATH.fullmatch(hookpoint)
    if match is None:
        return None
    n, sub = int(match["n"]), match["sub"]
    kind = "resid" if sub is None else ("mlp" if sub == "mlp" else "attn")
    out = {"resid": f"blocks.{n}.hook_resid_post", "mlp": f"blocks.{n}.hook_mlp_out",
           "attn": f"blocks.{n}.hook_attn_out"}[kind]
    if not transcode:
        return out, None, None
    if kind == "resid":
        return f"blocks.{n}.hook_resid_pre", out, None
    norm = "ln2" if kind == "mlp" else "ln1"
    hook = f"blocks.{n}.{norm}.hook_normalized"
    return hook, out, NORM_CAVEAT.format(hook=hook, norm=norm)


def _naming(model_name) -> tuple[str, str, str]:
    """(layer stack, attention module, embedding module) of sparsify's hookpoints for a model family."""
    family = _family(model_name)
    return {"gpt2": ("h", "attn", "wte"), "neox": ("layers", "attention", "embed_in")}.get(
        family, ("layers", "self_attn", "embed_tokens"))


def _family(model_name) -> str:
    name = model_name.lower() if isinstance(model_name, str) else ""
    if "gpt2" in name or "gpt-2" in name:
        return "gpt2"
    if "pythia" in name or "neox" in name:
        return "neox"
    if re.search(r"gemma-?[23]", name):
        return "gemma2"  # a norm before the MLP (pre_feedforward_layernorm) and one after it
    return "llama"


# HF causal LMs: the base model's attribute (HookedProxyLM names modules from the CausalLM down), and the norm
# modules whose outputs are the MLP's and the attention's inputs.
_HF_LAYOUT = {  # family: (base prefix, norm before the MLP, norm before the attention)
    "llama": ("model", "post_attention_layernorm", "input_layernorm"),
    "gemma2": ("model", "pre_feedforward_layernorm", "input_layernorm"),
    "gpt2": ("transformer", "ln_2", "ln_1"),
    "neox": ("gpt_neox", "post_attention_layernorm", "input_layernorm"),
}


def hf_module_hooks(hookpoint: str, transcode: bool, model_name) -> tuple[str, str | None] | None:
    """(hook_name, hook_name_out or None) as SAELens's HookedProxyLM (model_class_name "AutoModelForCausalLM") names
    them: the HF CausalLM's module paths, each hooking that module's output, exactly the tensors sparsify taps.
    A transcoder reads its module's input, which is the output of the norm module before it (None where no module
    outputs exactly that input)."""
    prefix, mlp_norm, attn_norm = _HF_LAYOUT[_family(model_name)]
    bare = hookpoint[len(prefix) + 1:] if hookpoint.startswith(prefix + ".") else hookpoint
    full = f"{prefix}.{bare}"
    if not transcode:
        return full, None
    match = _LAYER_PATH.fullmatch(bare)
    if match is None:
        return None
    stack, n = match["stack"], int(match["n"])
    if match["sub"] is None:
        # a whole layer reads the previous layer's output; layer 0 reads the embeddings after model-specific
        # scaling or positions, which no module outputs
        return (f"{prefix}.{stack}.{n - 1}", full) if n > 0 else None
    norm = mlp_norm if match["sub"] == "mlp" else attn_norm
    return f"{prefix}.{stack}.{n}.{norm}", full


def _strip_hf_prefix(hook: str, model_name) -> str | None:
    prefix = _HF_LAYOUT[_family(model_name)][0]
    return hook[len(prefix) + 1:] if hook.startswith(prefix + ".") else None


_TL_HOOK = re.compile(r"blocks\.(?P<n>\d+)\.(?P<hook>hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out|"
                      r"ln2\.hook_normalized|ln1\.hook_normalized)")


def sparsify_hookpoint(metadata: dict, transcoder: bool) -> str | None:
    """The reverse of `transformer_lens_hooks` and `hf_module_hooks`: the sparsify hookpoint (the HF module path,
    named as the model family in `model_name` names its modules) of a SAELens coder's metadata; None where there
    is none (a head index, an unknown hook). A hookpoint that we wrote ourselves (metadata["sparsify_hookpoint"])
    comes back as it was."""
    saved = metadata.get("sparsify_hookpoint")
    if isinstance(saved, str) and saved:
        return saved
    if metadata.get("hook_head_index") is not None:
        return None
    stack, attn, embed = _naming(metadata.get("model_name"))
    hook, hook_out = metadata.get("hook_name"), metadata.get("hook_name_out")
    if not isinstance(hook, str):
        return None
    if metadata.get("model_class_name") == "AutoModelForCausalLM":  # HF module paths (HookedProxyLM)
        target = hook_out if transcoder else hook
        return _strip_hf_prefix(target, metadata.get("model_name")) if isinstance(target, str) else None
    if hook == "hook_embed" and not transcoder:
        return embed
    match = _TL_HOOK.fullmatch(hook)
    if match is None:
        return None
    n, kind = int(match["n"]), match["hook"]
    if not transcoder:
        if kind == "hook_resid_pre":
            return f"{stack}.{n - 1}" if n > 0 else None  # block 0's input is the embedding (plus positions)
        return {"hook_resid_post": f"{stack}.{n}", "hook_mlp_out": f"{stack}.{n}.mlp",
                "hook_attn_out": f"{stack}.{n}.{attn}"}.get(kind)
    expected_out = {"hook_resid_pre": f"blocks.{n}.hook_resid_post", "ln2.hook_normalized": f"blocks.{n}.hook_mlp_out",
                    "ln1.hook_normalized": f"blocks.{n}.hook_attn_out"}.get(kind)
    if expected_out is None or hook_out != expected_out:
        return None
    return {"hook_resid_pre": f"{stack}.{n}", "ln2.hook_normalized": f"{stack}.{n}.mlp",
            "ln1.hook_normalized": f"{stack}.{n}.{attn}"}[kind]


def read_hookpoint(folder: Path) -> str | None:
    """The sparsify hookpoint of a SAELens folder from its cfg.json alone (None where it has none or cannot be read;
    `read_saelens` reports a bad folder)."""
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = _normalise_config(json.loads(path.read_text()), str(path))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, CheckpointError):
        return None
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return sparsify_hookpoint(metadata, cfg.get("architecture") not in (None, TOPK, "standard"))


HOOK_VOCABULARIES = ("transformer-lens", "hf")


def export_metadata(hookpoint: str, transcode: bool, run: dict,
                    hook_names: str = "transformer-lens") -> tuple[dict, list[str]]:
    """(SAELens metadata, notes) for our coder at `hookpoint`; `run` holds what the run folder says about training
    (model, dataset, ctx_len: sparsify's config.json or our state.json). SAELens reads `hook_name` (and
    `hook_name_out` for transcoders) to attach the coder, `model_name`/`model_class_name` to load the model.
    `hook_names`: "transformer-lens" (HookedTransformer's names, for models TransformerLens supports) or "hf" (the HF
    module paths of SAELens's HookedProxyLM: any HF causal LM, and exact for transcoders)."""
    if hook_names not in HOOK_VOCABULARIES:
        raise UserError(f"unknown hook-name vocabulary {hook_names!r}: choose {' or '.join(HOOK_VOCABULARIES)}")
    notes = []
    meta = {"model_name": run.get("model"), "hook_head_index": None}
    tl = transformer_lens_hooks(hookpoint, transcode) if hook_names == "transformer-lens" else None
    hf = hf_module_hooks(hookpoint, transcode, run.get("model")) if hook_names == "hf" else None
    if tl is not None:
        hook, hook_out, caveat = tl
        meta.update(hook_name=hook, model_class_name="HookedTransformer")
        if caveat:
            notes.append(caveat + "; or export with --hook-names hf, whose hooks are exact")
    elif hf is not None:
        hook, hook_out = hf
        meta.update(hook_name=hook, model_class_name="AutoModelForCausalLM")
    else:
        hook, hook_out = hookpoint, (hookpoint if transcode else None)
        meta["hook_name"] = hook
        vocabulary = "TransformerLens" if hook_names == "transformer-lens" else "HookedProxyLM"
        notes.append(f"{vocabulary} has no hook for {hookpoint!r}: hook_name is sparsify's module path")
    notes.insert(0, f"hook_name {meta['hook_name']}" + (f" -> hook_name_out {hook_out}" if transcode else ""))
    if transcode:
        meta.update(hook_name_out=hook_out, hook_head_index_out=None)
    if isinstance(run.get("ctx_len"), int):
        meta["context_size"] = run["ctx_len"]
    dataset = run.get("dataset")
    if isinstance(dataset, str) and _looks_like_hub_dataset(dataset):
        meta["dataset_path"] = dataset
    meta.update(sparsify_hookpoint=hookpoint, converted_by="sae_core.convert")
    return meta, notes


def _looks_like_hub_dataset(name: str) -> bool:
    """A hub dataset id (org/name), not a local file or folder, nor one of our built-in texts."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None
            and not Path(name).expanduser().exists())


def ours_to_saelens(cfg: SparseCoderConfig, d_in: int, d_out: int, tensors: dict[str, np.ndarray], *,
                    metadata: dict | None = None, reshape_activations: str = "none",
                    where: str = "checkpoint") -> tuple[dict, dict[str, np.ndarray]]:
    """(cfg.json dict, tensors) in SAELens's layout; refuses what SAELens cannot compute the same way."""
    if cfg.activation != "topk":
        raise UserError(f"{where}: cannot convert activation {cfg.activation!r} to SAELens: SAELens has no groupmax "
                        f"(one latent per group of M/k) architecture, and its topk would select differently")
    if cfg.skip_connection and not cfg.transcode:
        raise UserError(f"{where}: cannot convert an autoencoder with skip_connection to SAELens: its 'topk' "
                        f"architecture has no W_skip and its skip transcoders never subtract b_dec")
    num_latents = cfg.num_latents_for(d_in)
    arch = TOPK if not cfg.transcode else (TOPK_SKIP_TRANSCODER if cfg.skip_connection else TOPK_TRANSCODER)
    out = {"W_enc": np.ascontiguousarray(np.swapaxes(tensors["encoder.weight"], 0, 1)),
           "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if cfg.skip_connection:
        out["W_skip"] = tensors["W_skip"]
    dtypes = {np.dtype(v.dtype).name for v in out.values()}
    dtype = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16"}.get(
        dtypes.pop() if len(dtypes) == 1 else "", None)
    if dtype is None:
        names = sorted({np.dtype(v.dtype).name for v in out.values()})
        raise UserError(f"{where}: tensors of mixed or unsupported dtypes {names}; "
                        f"pass a dtype to convert them to one")
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None}
    meta.update(metadata or {})
    if (_major(meta.get("sae_lens_version")) or 0) < 6:
        meta["sae_lens_version"] = SAELENS_VERSION  # an older version would send SAELens down its pre-6.0 path
    meta["sparsify"] = cfg.to_dict()
    result = {"d_in": d_in, "d_sae": num_latents, "dtype": dtype, "device": "cpu",
              "apply_b_dec_to_input": not cfg.transcode, "normalize_activations": "none",
              "reshape_activations": reshape_activations, "metadata": meta}
    if cfg.transcode:
        result["d_out"] = d_out
    result["k"] = cfg.k
    if not cfg.transcode:
        result["rescale_acts_by_decoder_norm"] = False
    result["architecture"] = arch
    return result, out


def write_saelens(folder: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_numpy(folder / WEIGHTS_FILE, tensors)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")


# ---- SAELens's forward in float64 (the reference the conversion is checked against) ----

class SaeLensReference:
    """SAELens's inference forward of a topk / topk_transcoder / topk_skip_transcoder folder, in float64.

    Written from SAELens's code, not from ours: topk on the raw pre-activation (then ReLU), the decoder-norm rescale,
    apply_b_dec_to_input, the skip term. `pre_acts` is the post-ReLU pre-activation that the top-k ranks (ReLU and
    top-k commute up to ties among values <= 0, which all decode to 0).
    """
    activation = "topk"

    def __init__(self, ck: SaeLensCheckpoint, chunk: int = 8192):
        self.ck, self.k, self.chunk = ck, ck.k, chunk
        self.num_latents = ck.d_sae
        w_dec = ck.tensors["W_dec"]
        self.norms = (np.linalg.norm(w_dec.astype(np.float64), axis=1) if ck.rescale_acts_by_decoder_norm else None)

    def encoder_directions(self, idx: np.ndarray) -> np.ndarray:
        return self.ck.tensors["W_enc"][:, idx].T.astype(np.float64)

    def input_center(self) -> np.ndarray:
        t = self.ck.tensors
        return t["b_dec"].astype(np.float64) if self.ck.apply_b_dec_to_input else np.zeros(self.ck.d_in)

    def pre_acts(self, x: np.ndarray) -> np.ndarray:
        t = self.ck.tensors
        x = np.asarray(x, dtype=np.float64)
        x_in = x - t["b_dec"].astype(np.float64) if self.ck.apply_b_dec_to_input else x
        pre = reference.pre_activations(x_in, t["W_enc"].T, t["b_enc"], self.chunk)  # W_enc is [d_in, d_sae]
        if self.norms is not None:
            pre *= self.norms  # relu commutes with the positive decoder norms
        return pre

    def decode(self, x: np.ndarray, indices: np.ndarray, acts: np.ndarray) -> np.ndarray:
        t = self.ck.tensors
        if self.norms is not None:
            acts = acts / self.norms[indices]
        return reference.reconstruct(x, acts, indices, t["W_dec"], t["b_dec"], t.get("W_skip"))


# ---- making SAELens itself load our TopK transcoders ----

def register_with_sae_lens() -> None:
    """Register "topk_transcoder" and "topk_skip_transcoder" with an installed sae_lens (imports torch and sae_lens).

    sae-lens (checked 6.54.12) has only ReLU transcoders; after this call `SAE.load_from_disk(folder)` loads the
    TopK transcoders that `sae convert --to saelens` writes, with SAELens's own TopK activation. Idempotent.
    """
    from dataclasses import dataclass as _dataclass

    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.topk_sae import TopK
    from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

    if TOPK_TRANSCODER in SAE_CLASS_REGISTRY and TOPK_SKIP_TRANSCODER in SAE_CLASS_REGISTRY:
        return

    @_dataclass
    class TopKTranscoderConfig(TranscoderConfig):
        k: int = 32

        @classmethod
        def architecture(cls) -> str:
            return TOPK_TRANSCODER

    @_dataclass
    class TopKSkipTranscoderConfig(SkipTranscoderConfig):
        k: int = 32

        @classmethod
        def architecture(cls) -> str:
            return TOPK_SKIP_TRANSCODER

    class TopKTranscoder(Transcoder):
        def get_activation_fn(self):
            return TopK(self.cfg.k)

    class TopKSkipTranscoder(SkipTranscoder):
        def get_activation_fn(self):
            return TopK(self.cfg.k)

    if TOPK_TRANSCODER not in SAE_CLASS_REGISTRY:
        register_sae_class(TOPK_TRANSCODER, TopKTranscoder, TopKTranscoderConfig)
    if TOPK_SKIP_TRANSCODER not in SAE_CLASS_REGISTRY:
        register_sae_class(TOPK_SKIP_TRANSCODER, TopKSkipTranscoder, TopKSkipTranscoderConfig)
