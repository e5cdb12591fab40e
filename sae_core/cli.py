"""The `sae` command: train, eval, harvest, convert, parity. Framework-free; the work is done by a backend (or, for
`parity`, by the checkout's `python -m parity`).

A backend `sae_<name>` (torch or mlx) provides:
    sae_<name>.trainer.train(cfg, source=None, *, resume, explicit, overwrite, progress) -> result dict
    sae_<name>.eval.evaluate(run, **options) -> report dict
    sae_<name>.activations.harvest(out, cfg, *, save_dtype, shard_tokens, overwrite, progress) -> manifest dict
and everything it prints comes from sae_core.metrics, so both backends read the same.

Train flags are generated from TrainConfig's fields (sparsify's names: --batch_size, --k, --expansion_factor,
--hookpoints, --layers, --grad_acc_steps, --lr, --auxk_alpha, --dead_feature_threshold, --save_every, --optimizer,
--run_name, ...), with help taken from the field docstrings. User mistakes print one line `error: ...` and exit 2;
a failed write (disk full, read-only folder) prints one line and exits 1; Ctrl-C or SIGTERM exits 130 (during
training: after saving a checkpoint).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import platform
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

from .config import ACTIVATIONS, SparseCoderConfig
from .errors import UserError
from .train_config import DTYPES, OPTIMIZERS, TrainConfig

BACKENDS = ("auto", "torch", "mlx")
CHOICES = {"optimizer": OPTIMIZERS, "dtype": DTYPES, "activation": ACTIVATIONS}

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `error: ...` (exit 2) like every other user mistake, instead of the
    usage block followed by the error; the hint says where the usage is."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _field_docs(cls) -> dict[str, str]:
    """The string literal following each field of a dataclass in its source (our field docstrings)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _optional_int(text: str):
    if text.lower() in ("none", "all"):
        return None
    try:
        return int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _optional_float(text: str):
    if text.lower() in ("none", "auto"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _add_field(group, name: str, annotation, default, help_text: str, dest: str) -> None:
    text = str(annotation)
    kwargs: dict = {"dest": dest, "default": argparse.SUPPRESS}
    shown = default if not isinstance(default, list) else " ".join(map(str, default)) or "none"
    help_text = help_text.replace("%", "%%")  # argparse %-formats help; a docstring's "dead %" is text
    help_text = f"{help_text} [default: {shown}]" if help_text else f"[default: {shown}]"
    if annotation is bool or text in ("bool", "bool | None"):  # None: the default depends on other fields
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_text, **kwargs)
        return
    if "list[int]" in text:
        kwargs.update(nargs="*" if "None" in text else "+", type=int, metavar="N")
    elif "list[str]" in text:
        kwargs.update(nargs="+", metavar="NAME")
    elif "int" in text:
        kwargs.update(type=_optional_int if "None" in text else int, metavar="N")
    elif "float" in text:
        kwargs.update(type=_optional_float if "None" in text else float, metavar="X")
    elif name in CHOICES:
        kwargs.update(choices=CHOICES[name])
    else:
        kwargs.update(metavar="TEXT")
    group.add_argument(f"--{name}", help=help_text, **kwargs)


def add_train_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per TrainConfig field (and per SparseCoderConfig field, under the same flat names)."""
    docs, sae_docs = _field_docs(TrainConfig), _field_docs(SparseCoderConfig)
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    sae_group = parser.add_argument_group("sparse coder")
    for f in fields(SparseCoderConfig):
        if only is None or f.name in only:
            _add_field(sae_group, f.name, typing.get_type_hints(SparseCoderConfig)[f.name],
                       getattr(defaults.sae, f.name), sae_docs.get(f.name, ""), f"sae.{f.name}")
    group = parser.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name == "sae" or (only is not None and f.name not in only):
            continue
        _add_field(group, f.name, hints[f.name], getattr(defaults, f.name), docs.get(f.name, ""), f.name)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from the parsed flags, and the set of field names the user gave explicitly."""
    cfg = TrainConfig()
    given = set()
    for key, value in vars(args).items():
        if key.startswith("sae."):
            setattr(cfg.sae, key[4:], value)
            given.add(key)
        elif key in {f.name for f in fields(TrainConfig)}:
            setattr(cfg, key, value)
            given.add(key)
    return cfg, given


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------

def resolve_backend(name: str) -> str:
    """auto: Metal (Apple silicon with MLX) -> mlx; CUDA -> torch; otherwise torch."""
    if name != "auto":
        return name
    if sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            import mlx.core as mx

            if mx.metal.is_available():
                return "mlx"
        except Exception:
            pass
    return "torch"


def backend_module(backend: str, part: str):
    try:
        return importlib.import_module(f"sae_{backend}.{part}")
    except ModuleNotFoundError as e:
        if e.name == f"sae_{backend}.{part}":
            raise UserError(f"the {backend} backend has no {part} module yet; use --backend torch") from None
        if e.name and e.name.split(".")[0] in ("torch", "mlx", "transformers", "tqdm", "matplotlib"):
            extra = {"torch": "torch", "mlx": "mlx"}.get(e.name.split(".")[0], "train")
            raise UserError(f"the {backend} backend needs the package {e.name.split('.')[0]!r}: "
                            f"pip install -e '.[{extra},train]'") from None
        raise


# ---------------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
    from .metrics import print_summary

    cfg, given = config_from_args(args)
    resume = args.resume if args.resume not in (None, False) else False
    _precheck(cfg, resume)
    train = args.train or backend_module(resolve_backend(args.backend), "trainer").train
    result = train(cfg, resume=resume, explicit=given, overwrite=args.overwrite, progress=not args.quiet,
                   plots=args.plots)
    if result.get("rank", 0) != 0:  # a distributed run: the summary is rank 0's to print
        return 130 if result["interrupted"] else 0
    print_summary(result)
    if result["interrupted"]:
        print(f"Resume with: sae train --resume {result['run_dir']}")
        return 130
    return 0


def _precheck(cfg: TrainConfig, resume) -> None:
    """Mistakes found without a backend (so before torch or mlx is even imported)."""
    from .data import check_dataset
    from .training_state import has_checkpoint

    if isinstance(resume, str):
        if not has_checkpoint(Path(resume).expanduser()):
            raise UserError(f"nothing to resume: {resume} holds no checkpoint")
        return  # the checkpoint's config applies; flags are checked against it
    cfg.validate()
    if cfg.activations is None:
        check_dataset(cfg.dataset)
        if cfg.model.startswith((".", "/", "~")) and not Path(cfg.model).expanduser().exists():
            raise UserError(f"model {cfg.model!r} not found: no such folder")


def _cmd_eval(args) -> int:
    from .hub import hub_run_model, resolve_source
    from .metrics import print_eval

    run = resolve_source(args.run, [args.hookpoint] if args.hookpoint else None, revision=args.revision,
                         extra_files=("config.json",))
    model = args.model or hub_run_model(args.run, run)
    run = run / args.hookpoint if args.hookpoint else run
    if not run.exists():
        raise UserError(f"run folder {run} not found")

    evaluator = backend_module(resolve_backend(args.backend), "eval")
    report = evaluator.evaluate(run, model=model, dataset=args.dataset, split=args.split,
                                max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device,
                                dtype=args.dtype, text_column=args.text_column, progress=not args.quiet)
    print_eval(report)
    return 0


def _cmd_harvest(args) -> int:
    cfg, _ = config_from_args(args)
    if "max_tokens" not in vars(args):
        cfg.max_tokens = None  # harvest: one pass over the split unless told otherwise
    _precheck(cfg, False)
    acts = backend_module(resolve_backend(args.backend), "activations")
    manifest = acts.harvest(args.out, cfg, save_dtype=args.save_dtype, shard_tokens=args.shard_tokens,
                            overwrite=args.overwrite, progress=not args.quiet)
    hooks = ", ".join(f"{h} ({w['d_in']}->{w['d_out']})" for h, w in manifest["hookpoints"].items())
    print(f"Harvested {manifest['total_tokens']:,} tokens of {hooks} into {args.out} "
          f"({len(manifest['shards'])} shard(s)); train on it with: sae train --activations {args.out}")
    return 0


def build_parser(default_backend: str = "auto") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sae", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate TopK sparse autoencoders and transcoders (sparsify-compatible checkpoints).",
        epilog="examples:\n"
               "  sae train                                  SmolLM2-135M on built-in text (offline, CPU-sized)\n"
               "  sae train --model gpt2 --dataset NeelNanda/pile-10k --layers 3 6 9 --batch_size 16\n"
               "  sae train --resume runs/smollm2-layers.7   continue a run exactly where it stopped\n"
               "  sae eval runs/smollm2-layers.7             FVU, L0, dead %, CE loss recovered, KL\n"
               "  sae harvest acts/ --layers 7 && sae train --activations acts/\n"
               "run `sae COMMAND --help` for a command's flags")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def backend_flag(p):
        p.add_argument("--backend", choices=BACKENDS, default=default_backend,
                       help=f"auto: mlx on Apple-silicon Metal, else torch [default: {default_backend}]")

    train = sub.add_parser("train", help="train sparse coders", formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train one sparse coder per hookpoint (and init seed) on a language model's "
                                       "activations, from one model forward per batch. With no flags: SmolLM2-135M "
                                       "(offline) on the text of pydoc_data.topics, a CPU-sized run.")
    backend_flag(train)
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                       help="continue a run exactly: a run folder, or the one named by --run_name / the defaults")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder of that name")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                       help="write plots/*.png at the end [default: True]")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained run on held-out text",
                        description="FVU, L0 and dead % on held-out text; with each coder spliced into the model "
                                    "(the hookpoint's output replaced by the reconstruction): CE loss increase, "
                                    "fraction of CE loss recovered vs zero-ablation, and KL to the clean model.")
    backend_flag(ev)
    ev.add_argument("run", metavar="RUN", help="a run folder (from sae train), a hookpoint folder, or a Hugging Face "
                                               "Hub repo of coders (e.g. EleutherAI/sae-llama-3-8b-32x)")
    ev.add_argument("--hookpoint", metavar="NAME", help="only this hookpoint folder of RUN (of a hub repo: only it "
                                                        "is downloaded)")
    ev.add_argument("--revision", metavar="REV", help="of a hub repo: the branch, tag or commit [default: main]")
    ev.add_argument("--model", help="the model (default: the run's; for a hub repo, its config.json's)")
    ev.add_argument("--dataset", help="the text (default: the run's)")
    ev.add_argument("--split", default="test", help="[default: test, the run's held-out chunks]")
    ev.add_argument("--max_tokens", type=_optional_int, default=32768, metavar="N", help="[default: 32768]")
    ev.add_argument("--batch_size", type=int, default=None, metavar="N", help="sequences per forward "
                                                                             "[default: the run's]")
    ev.add_argument("--device", default=None, help="[default: the run's]")
    ev.add_argument("--dtype", default=None, help="model dtype [default: the run's]")
    ev.add_argument("--text_column", default=None, help="[default: the run's]")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval)

    hv = sub.add_parser("harvest", help="write an activation cache to train from",
                        description="Run the model over the data once and store the hookpoints' activations "
                                    "(safetensors shards + manifest.json); `sae train --activations OUT` streams "
                                    "them. Without --max_tokens: one pass over the split.")
    backend_flag(hv)
    hv.add_argument("out", metavar="OUT", help="cache folder to write")
    hv.add_argument("--save_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the stored activations [default: float32]")
    hv.add_argument("--shard_tokens", type=int, default=65536, metavar="N", help="tokens per shard [default: 65536]")
    hv.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    hv.add_argument("--quiet", action="store_true", help="no progress bar")
    add_train_arguments(hv, only=("model", "dataset", "split", "text_column", "hookpoints", "layers", "layer_stride",
                                  "ctx_len", "exclude_tokens", "max_tokens", "batch_size", "seed", "dtype", "device",
                                  "transcode"))
    hv.set_defaults(func=_cmd_harvest)

    sub.add_parser("convert", help="convert checkpoints between sparsify's and SAELens's layouts "
                                   "(sae convert --help)", add_help=False)
    sub.add_parser("parity", help="check a backend against the float64 oracle (sae parity --help)", add_help=False)
    return parser


def _delegate(command: str, argv: list[str]) -> int:
    if command == "convert":
        try:
            from . import convert
        except ImportError as e:
            raise UserError(f"`sae convert` is not available ({e})") from None
        return int(convert.main(argv) or 0)
    # The parity suite is a tool of the source checkout (fixtures, oracle, Metal harness), not an installed package,
    # so it runs as `python -m parity` from the checkout this package lives in, in a child process.
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "parity" / "__main__.py").is_file():
        raise UserError("`sae parity` is not available in this installation: it runs the parity suite of a source "
                        "checkout (python -m parity from the repository root)")
    path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "parity", *argv], env={**os.environ, "PYTHONPATH": path}).returncode


def main(argv: list[str] | None = None, default_backend: str = "auto", train=None) -> int:
    """The `sae` command. `train`: the train function to use (sae_*.distributed's, under a distributed launch);
    default: the chosen backend's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch's first matmul: see sae_torch/trainer.py
    # torch reads this at its first CPU allocation: tensors of 2 MB and more get transparent huge pages, so a fresh
    # [N, M] pre-activation tensor costs ~700 page faults instead of ~98k (a 14% faster CPU training step, measured
    # by bench/ --thp). Linux only; harmless elsewhere.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        if argv and argv[0] in ("convert", "parity"):
            return _delegate(argv[0], argv[1:])
        parser = build_parser(default_backend)
        args = parser.parse_args(argv)
        args.train = train
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only or forbidden folder: the environment, not a bug; one line
        from .training_state import describe_write_error

        message = describe_write_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "config_from_args", "resolve_backend"]
