"""`sae convert`: move a checkpoint between sparsify's layout (ours) and SAELens's, proven on every conversion.

    sae convert SRC DST --to sparsify|saelens [--dtype fp32|bf16|fp16] [--hookpoint NAME ...] [--no-verify]
                        [--overwrite] [--revision REV]

SRC is one hookpoint folder, a run folder of them, or a Hugging Face Hub repo of them (`sae_core.hub`: only the
--hookpoint folders are downloaded, at --revision); the format of each is detected from its files (sparsify:
`cfg.json` + `sae.safetensors`; SAELens: `cfg.json` + `sae_weights.safetensors`). Converting into the same format
re-saves (e.g. to change the dtype). NumPy + safetensors only: no torch, no MLX, no sae_lens.

Proof: every converted hookpoint is written, read back from disk, and evaluated in float64 next to the source on a
seeded batch built to activate many latents: the source with its own format's forward (ours: `sae_core.reference`,
the same code as the parity oracle's; SAELens: `saelens.SaeLensReference`, written from SAELens's code), the output
with its format's. The dense ReLU pre-activations, the selection (the output's choice must be a valid
top-k / groupmax choice on the source's values, and the index sets must agree among entries clearly > 0 away from
near-ties), the latent values and the reconstruction must agree within max|diff| <= tol * max|ref|, with
tol = 1e-4 when source and output are fp32/fp64 and 2e-2 when either is bf16 or fp16. Only then does the output
move into place: everything is written under a hidden temporary folder beside DST and renamed at the end, so a
refusal, a failed check, a crash or Ctrl-C leaves DST as it was (absent, or the old one with --overwrite).
See `sae_core/saelens.py` for the SAELens format and what is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import hub, saelens
from .checkpoint import (CONFIG_FILE, WEIGHTS_FILE, load_checkpoint_numpy, make_staging_dir, release_staging_dir,
                         save_checkpoint_numpy, write_text_atomic)
from .reference import SparseCoderReference, select_indices, selection_boundary
from .config import SparseCoderConfig
from .train_config import BUILTIN_MODEL
from .errors import CheckpointError, UserError

FORMATS = ("sparsify", "saelens")
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "f32": "float32",
                 "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16", "f16": "float16", "half": "float16"}
LOW_PRECISION = ("bfloat16", "float16")
BUILTIN_MODEL_HF = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOLERANCE = {False: 1e-4, True: 2e-2}  # max|diff| / max|ref|: fp32 (or wider) / bf16 or fp16 involved
BATCH_SIZE = 64


class VerificationError(UserError):
    """The converted checkpoint does not compute what the source computes; nothing was written."""


@dataclass
class HookpointReport:
    name: str
    source_format: str
    target_format: str
    dtype: str
    path: Path
    verified: bool = False
    tolerance: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # relative max errors: pre_acts, latent_acts, sae_out
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.name}: {self.source_format} -> {self.target_format} ({self.dtype})"
        if self.verified:
            worst = max(self.errors.values()) if self.errors else 0.0
            text += (f", verified on {BATCH_SIZE} inputs: max error {worst:.1e} x max|ref| "
                     f"(tolerance {self.tolerance:.0e})")
        else:
            text += ", NOT verified (--no-verify)"
        return text + "".join(f"\n    note: {note}" for note in self.notes)


# ---- finding and reading sources ----

def detect_format(folder: Path) -> str:
    folder = Path(folder)
    has_sparsify = (folder / WEIGHTS_FILE).is_file()
    has_saelens = (folder / saelens.WEIGHTS_FILE).is_file()
    if has_sparsify and has_saelens:
        raise CheckpointError(f"{folder}: holds both {WEIGHTS_FILE} (sparsify) and {saelens.WEIGHTS_FILE} (SAELens); "
                              f"cannot tell which one {CONFIG_FILE} describes")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; a checkpoint folder holds {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} (sparsify) or {saelens.WEIGHTS_FILE} (SAELens)")
    if has_sparsify:
        return "sparsify"
    if has_saelens:
        return "saelens"
    raise CheckpointError(f"{folder}: {CONFIG_FILE} but no weights: expected {WEIGHTS_FILE} (sparsify) or "
                          f"{saelens.WEIGHTS_FILE} (SAELens)")


def find_hookpoints(src: Path, hookpoint=None) -> tuple[bool, list[tuple[str, Path]]]:
    """(is_run_folder, [(name, folder)]) for a hookpoint folder or a run folder, optionally only `hookpoint`(s)."""
    src = Path(src)
    wanted = [hookpoint] if isinstance(hookpoint, str) else (list(hookpoint) if hookpoint else [])
    if not src.exists():
        raise UserError(f"{src}: not found")
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (give a hookpoint folder or a run folder of them)")
    if (src / CONFIG_FILE).is_file():
        if wanted and wanted != [src.name]:
            raise UserError(f"{src} is itself a checkpoint folder; --hookpoint selects folders inside a run folder")
        return False, [(src.name, src)]
    names = sorted(p.name for p in src.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if not names:
        raise UserError(f"{src}: no checkpoint found: expected {CONFIG_FILE} with {WEIGHTS_FILE} (sparsify) or "
                        f"{saelens.WEIGHTS_FILE} (SAELens), or a run folder whose subfolders hold them")
    if wanted:
        missing = [name for name in wanted if name not in names]
        if missing:
            raise UserError(f"{src}: no hookpoint folder(s) {', '.join(missing)}; found {', '.join(names)}")
        names = [name for name in names if name in wanted]
    return True, [(name, src / name) for name in names]


def _run_info(run_folder: Path) -> dict:
    """What a run folder says about its training: {model, dataset, ctx_len} from sparsify's config.json, or from the
    train_config in our state.json; {} when neither is there."""
    for name, key in (("config.json", None), ("state.json", "train_config")):
        path = Path(run_folder) / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if isinstance(data, dict) and key is not None:
            data = data.get(key)
        if isinstance(data, dict):
            info = {k: data[k] for k in ("model", "dataset", "ctx_len") if k in data}
            if info.get("model") == BUILTIN_MODEL:
                info["model"] = BUILTIN_MODEL_HF  # the built-in model is this hub model, converted offline
            return info
    return {}


# ---- the proof ----

def _selected_mask(indices: np.ndarray, m: int) -> np.ndarray:
    mask = np.zeros((len(indices), m), dtype=bool)
    np.put_along_axis(mask, indices, True, axis=1)
    return mask


def make_batch(ref, d_in: int, n: int = BATCH_SIZE, seed: int = 0) -> np.ndarray:
    """Seeded inputs that switch on many latents: the input centre plus positive mixes of encoder directions
    (scaled so each chosen latent gets a pre-activation of about 1-2 plus its bias deficit), Gaussian noise, and a
    few noise-only rows."""
    rng = np.random.default_rng(seed)
    m, k = ref.num_latents, ref.k
    count = min(m, 2 * k)
    center = ref.input_center()
    x = np.empty((n, d_in))
    for row in range(n):
        idx = rng.choice(m, size=count, replace=False)
        dirs = ref.encoder_directions(idx)
        sq = np.maximum((dirs ** 2).sum(axis=1), 1e-30)
        signal = rng.uniform(0.5, 2.0, size=count) @ (dirs / sq[:, None])
        scale = max(np.linalg.norm(signal), 1e-6)
        noise = rng.normal(size=d_in) * scale / np.sqrt(d_in)
        x[row] = center + (noise * 3 if row % 8 == 7 else signal + 0.3 * noise)
    return x


def verify(src_ref, out_ref, d_in: int, low_precision: bool, seed: int = 0, where: str = "") -> tuple[float, dict]:
    """Raise VerificationError unless out_ref computes what src_ref computes; return (tolerance, relative errors)."""
    tol = TOLERANCE[low_precision]
    x = make_batch(src_ref, d_in, seed=seed)
    pre_s, pre_o = src_ref.pre_acts(x), out_ref.pre_acts(x)
    activation, k = src_ref.activation, src_ref.k
    if out_ref.activation != activation or out_ref.k != k or pre_o.shape != pre_s.shape:
        raise VerificationError(f"{where}: converted checkpoint has activation {out_ref.activation} k={out_ref.k} "
                                f"M={pre_o.shape[1]}, the source {activation} k={k} M={pre_s.shape[1]}")
    errors = {}

    def check(name, ref, got):
        scale = np.abs(ref).max()
        err = float(np.abs(got - ref).max() / scale) if scale > 0 else float(np.abs(got).max() > 0)
        errors[name] = err
        if not err <= tol:
            raise VerificationError(f"{where}: verification failed: {name} differ from the source's by "
                                    f"{err:.2e} x max|ref| (tolerance {tol:.0e}); nothing was written")

    check("pre_acts", pre_s, pre_o)
    tol_abs = tol * max(np.abs(pre_s).max(), 1e-30)
    idx_s, idx_o = select_indices(pre_s, activation, k), select_indices(pre_o, activation, k)
    # the output's selection must be a valid one for the source's values ...
    bound = selection_boundary(pre_s, activation, k)
    chosen_o = np.take_along_axis(pre_s, idx_o, axis=1)
    if (chosen_o < np.take_along_axis(bound, idx_o, axis=1) - 2 * tol_abs).any():
        raise VerificationError(f"{where}: verification failed: the converted checkpoint selects latents the source "
                                f"would not (beyond near-ties); nothing was written")
    # ... and the index sets agree among entries clearly > 0 that are not near-ties at the selection boundary
    m = pre_s.shape[1]
    clear_s = _selected_mask(idx_s, m) & (pre_s > tol_abs)
    clear_o = _selected_mask(idx_o, m) & (pre_o > tol_abs)
    near_tie = np.abs(pre_s - bound) <= 2 * tol_abs
    if ((clear_s ^ clear_o) & ~near_tie).any():
        raise VerificationError(f"{where}: verification failed: the selected latents differ from the source's; "
                                f"nothing was written")
    acts_s, acts_o = np.take_along_axis(pre_s, idx_o, axis=1), np.take_along_axis(pre_o, idx_o, axis=1)
    check("latent_acts", acts_s, acts_o)
    check("sae_out", src_ref.decode(x, idx_o, acts_s), out_ref.decode(x, idx_o, acts_o))
    return tol, errors


# ---- one hookpoint ----

def _dtype_name(array: np.ndarray) -> str:
    return np.dtype(array.dtype).name


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _cast(tensors: dict[str, np.ndarray], name: str, where: str) -> dict[str, np.ndarray]:
    dtype = _numpy_dtype(name)
    out = {}
    for key, value in tensors.items():
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(value.astype(dtype))
        if not np.isfinite(cast.astype(np.float64)).all():
            raise UserError(f"{where}: tensor {key!r} does not fit in {name} (max |value| = "
                            f"{np.abs(value.astype(np.float64)).max():.3g}); choose a wider --dtype")
        out[key] = cast
    return out


def _source_dtype(tensors: dict[str, np.ndarray]) -> str:
    """The source's dtype; for mixed dtypes the narrowest one that holds them all exactly."""
    names = {_dtype_name(t) for t in tensors.values()}
    if len(names) == 1:
        return names.pop()
    return "float64" if "float64" in names else "float32"


def _read_sparsify_extras(folder: Path) -> dict:
    data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    known = set(SparseCoderConfig().to_dict()) | {"d_in", "d_out"}
    extras = {key: value for key, value in data.items() if key not in known}
    if extras.get("signed"):
        raise UserError(f"{folder / CONFIG_FILE}: signed=true (an old sparsify option that keeps negative "
                        f"activations) is not supported")
    return extras


def _convert_one(name: str, folder: Path, out: Path, to: str, dtype: str | None, do_verify: bool,
                 run_info: dict, seed: int, hook_names: str) -> HookpointReport:
    fmt = detect_format(folder)
    where = str(folder)
    if fmt == "sparsify":
        cfg, d_in, d_out, tensors = load_checkpoint_numpy(folder)
        extras = _read_sparsify_extras(folder)
        src_ref, stored = SparseCoderReference(cfg, tensors), tensors
        notes = []
    else:
        ck = saelens.read_saelens(folder)
        src_ref, stored = saelens.SaeLensReference(ck), ck.tensors
        cfg, d_in, d_out, tensors, extras = saelens.saelens_to_ours(ck)
        notes = list(extras["saelens"].get("conversion_notes", []))
        if ck.reshape_activations == "hook_z":
            notes.append("reshape_activations='hook_z': feed inputs flattened to [..., n_heads * d_head]")
        hookpoint = saelens.sparsify_hookpoint(ck.metadata, ck.architecture != saelens.TOPK)
        hook = ck.metadata.get("hook_name")
        if to == "sparsify":
            notes.append(f"hookpoint {hookpoint} (from hook_name {hook})" if hookpoint is not None else
                         f"no sparsify hookpoint for hook_name {hook!r}: name the folder after the module yourself")
    target_dtype = dtype or _source_dtype(stored)
    tensors = _cast(tensors, target_dtype, where)
    report = HookpointReport(name, fmt, to, target_dtype, out, notes=notes)

    if to == "sparsify":
        save_checkpoint_numpy(out, cfg, d_in, d_out, tensors)
        if extras:
            data = json.loads((out / CONFIG_FILE).read_text())
            data.update(extras)
            write_text_atomic(out / CONFIG_FILE, json.dumps(data, indent=2) + "\n")
    else:
        previous = extras.get("saelens") if isinstance(extras.get("saelens"), dict) else None
        if previous is not None:  # it came from SAELens: give its metadata back
            metadata = dict(previous.get("metadata") or {})
            reshape = previous.get("reshape_activations", "none")
        else:
            metadata, hook_notes = saelens.export_metadata(name, cfg.transcode, run_info, hook_names)
            report.notes.extend(hook_notes)
            reshape = "none"
        sl_cfg, sl_tensors = saelens.ours_to_saelens(cfg, d_in, d_out, tensors, metadata=metadata,
                                                     reshape_activations=reshape, where=where)
        saelens.write_saelens(out, sl_cfg, sl_tensors)

    if do_verify:
        if to == "sparsify":
            cfg2, _, _, written = load_checkpoint_numpy(out)
            out_ref, written_dtypes = SparseCoderReference(cfg2, written), {_dtype_name(t) for t in written.values()}
        else:
            ck2 = saelens.read_saelens(out)
            out_ref, written_dtypes = saelens.SaeLensReference(ck2), {_dtype_name(t) for t in ck2.tensors.values()}
        low = bool((written_dtypes | {_dtype_name(t) for t in stored.values()}) & set(LOW_PRECISION))
        report.tolerance, report.errors = verify(src_ref, out_ref, d_in, low, seed=seed, where=where)
        report.verified = True
    return report


# ---- the whole conversion ----

def _output_names(items: list[tuple[str, Path]], to: str) -> dict[str, str]:
    """Folder names of a converted run: SAELens coders imported into sparsify's layout are named by their sparsify
    hookpoint (blocks.3.hook_resid_post -> layers.3: what load_many and `sae eval` hook), where every one maps and
    the names stay distinct; otherwise (and in every other direction) the source's folder names are kept."""
    if to != "sparsify":
        return {}
    mapped = {}
    for name, folder in items:
        if detect_format(folder) != "saelens":
            return {}
        hookpoint = saelens.read_hookpoint(folder)
        if hookpoint is None:
            return {}
        mapped[name] = hookpoint
    return mapped if len(set(mapped.values())) == len(mapped) else {}


def _normalise_dtype(dtype):
    if dtype is None:
        return None
    name = DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise UserError(f"unknown dtype {dtype!r}: choose fp32, bf16 or fp16")
    return name


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def convert(src, dst, to: str, dtype: str | None = None, verify: bool = True, hookpoint=None, *,
            overwrite: bool = False, seed: int = 0, revision: str | None = None,
            hook_names: str = "transformer-lens") -> list[HookpointReport]:
    """Convert a hookpoint folder or a run folder `src` into format `to` ("sparsify" or "saelens") at `dst`.

    `src` may also be a Hugging Face Hub repo name (a string that is no existing folder): then only the `hookpoint`
    folders (all when None) and the run's config.json are downloaded, at `revision` (see `sae_core.hub`).

    `dtype` ("fp32", "bf16", "fp16"; None keeps the source's), `hookpoint` (a name or a list: only these folders of a
    run folder), `verify` (prove each output from disk against the source; see the module docstring), `overwrite`
    (replace an existing non-empty `dst`, atomically), `hook_names` (to SAELens: "transformer-lens" or "hf", see
    `saelens.export_metadata`). A run folder gives a run folder with the same subfolder names (SAELens coders into
    sparsify's layout: named by their sparsify hookpoint where every one has one);
    a hookpoint folder gives a hookpoint folder. Raises UserError/CheckpointError/VerificationError with a clear
    message, and then `dst` is untouched. Returns one report per hookpoint.
    """
    if to not in FORMATS:
        raise UserError(f"unknown target format {to!r}: choose one of {', '.join(FORMATS)}")
    dtype = _normalise_dtype(dtype)
    if hook_names not in saelens.HOOK_VOCABULARIES:
        raise UserError(f"unknown hook-name vocabulary {hook_names!r}: choose "
                        f"{' or '.join(saelens.HOOK_VOCABULARIES)}")
    if not hub.is_local(src):
        wanted = [hookpoint] if isinstance(hookpoint, str) else (list(hookpoint) if hookpoint else None)
        src = hub.resolve_source(str(src), wanted, revision=revision,
                                 weights_files=(WEIGHTS_FILE, saelens.WEIGHTS_FILE), extra_files=("config.json",))
    src, dst = Path(src), Path(dst)
    is_run, items = find_hookpoints(src, hookpoint)
    src_abs, dst_abs = src.resolve(), dst.resolve()
    if dst_abs == src_abs or _is_within(dst_abs, src_abs) or _is_within(src_abs, dst_abs):
        raise UserError(f"{dst}: the destination must lie outside the source {src} (and not contain it)")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise UserError(f"{dst}: exists and is not a folder")
        if any(dst.iterdir()) and not overwrite:
            raise UserError(f"{dst}: exists and is not empty; choose a new destination or pass --overwrite")
    run_info = _run_info(src if is_run else src.parent)

    created = []
    parent = dst_abs.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dst_abs.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(dst_abs, "partial")  # also removes partial folders of killed converts
    backup = None
    try:
        reports = []
        out_names = _output_names(items, to) if is_run else {}
        for name, folder in items:
            out = staging / out_names.get(name, name) if is_run else staging
            reports.append(_convert_one(name, folder, out, to, dtype, verify, run_info, seed, hook_names))
        if is_run and (src / "config.json").is_file():
            shutil.copy2(src / "config.json", staging / "config.json")  # sparsify's run config, informational
        if dst_abs.exists():
            if any(dst_abs.iterdir()):
                backup = Path(tempfile.mkdtemp(prefix=f".{dst_abs.name}.", suffix=".old", dir=dst_abs.parent))
                os.replace(dst_abs, backup)
            else:
                dst_abs.rmdir()
        try:
            os.replace(staging, dst_abs)
        except BaseException:
            if backup is not None:
                os.replace(backup, dst_abs)
                backup = None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        release_staging_dir(staging)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    release_staging_dir(staging)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    for report in reports:
        report.path = dst_abs / out_names.get(report.name, report.name) if is_run else dst_abs
    return reports


# ---- CLI ----

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = textwrap.fill(
        "Convert sparse autoencoder/transcoder checkpoints between sparsify's layout (cfg.json + sae.safetensors, "
        "the format of this library) and SAELens's (cfg.json + sae_weights.safetensors). The source format is "
        "detected. Every converted hookpoint is read back and checked numerically against the source (same latents "
        "and reconstruction on a seeded batch, in float64) before it is moved into place; what the other format "
        "cannot express (groupmax in SAELens; JumpReLU, ReLU or gated SAEs, input normalisation in ours) is refused "
        "with a message, never dropped.", width=79)
    parser.epilog = (
        "examples:\n"
        "  sae convert runs/smollm2 out/smollm2-saelens --to saelens\n"
        "  sae convert runs/smollm2 out/one --to saelens --hookpoint layers.6 --dtype bf16\n"
        "  sae convert my-saelens-sae runs/imported/layers.6 --to sparsify\n"
        "  sae convert EleutherAI/sae-llama-3-8b-32x out/llama --to saelens --hookpoint layers.10\n"
        + textwrap.fill("TopK transcoders are written to SAELens as architecture 'topk_transcoder' / "
                        "'topk_skip_transcoder' (SAELens has only ReLU transcoders); call "
                        "sae_core.saelens.register_with_sae_lens() before SAE.load_from_disk.", width=79))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC",
                        help="a hookpoint folder, a run folder whose subfolders are hookpoints, or a Hugging Face "
                             "Hub repo of them (e.g. EleutherAI/sae-llama-3-8b-32x)")
    parser.add_argument("dst", metavar="DST", help="where to write (must not exist or be empty, unless --overwrite); "
                                                   "a run folder in gives a run folder out")
    parser.add_argument("--to", required=True, choices=FORMATS, help="target format")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="cast the weights (default: keep the source's dtype)")
    parser.add_argument("--hookpoint", action="append", metavar="NAME", default=None,
                        help="convert only this hookpoint folder of a run folder (repeat for several)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the numerical check of the written output against the source")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST (atomically)")
    parser.add_argument("--hook-names", dest="hook_names", choices=saelens.HOOK_VOCABULARIES,
                        default="transformer-lens",
                        help="to SAELens: TransformerLens hook names (blocks.N.hook_resid_post, ...) for models it "
                             "supports, or hf: the model's module paths for SAELens's AutoModelForCausalLM wrapper "
                             "(any HF model; exact for transcoders) [default: transformer-lens]")
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="with a hub name: the branch, tag or commit to read [default: main]")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        reports = convert(args.src, args.dst, to=args.to, dtype=args.dtype, verify=args.verify,
                          hookpoint=args.hookpoint, overwrite=args.overwrite, revision=args.revision,
                          hook_names=args.hook_names)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.describe())
    print(f"wrote {args.dst}")
    return 0


def main(argv=None) -> int:
    from .cli import OneLineParser  # here, not at the top: the cli imports this module lazily

    parser = add_arguments(OneLineParser(prog="sae convert"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own usage errors (code 2) and --help (code 0)
        return int(exit_.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
