"""Published checkpoints by Hugging Face Hub name, resolved to local folders (framework-free).

A hub repo of sparse coders holds what a run folder holds: one folder per hookpoint with `cfg.json` and
`sae.safetensors` (sparsify's layout, e.g. EleutherAI/sae-llama-3-8b-32x), or a single coder at its root. Only the
folders asked for are downloaded (`snapshot_download(allow_patterns=...)`), into huggingface_hub's own cache, with
its token, endpoint and offline settings (HF_TOKEN / `hf auth login`, HF_HUB_CACHE, HF_HUB_OFFLINE, ...) as the user
has them. Each backend's `SparseCoder.load_from_hub` / `load_many` turns the folders into coders; `sae convert` and
`sae eval` read them as local folders.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import re
from pathlib import Path

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE
from .errors import CheckpointError, UserError

INSTALL_HINT = "pip install huggingface_hub (or: pip install 'sae-twins[hub]')"


class HubError(UserError):
    """A hub name that cannot be resolved: not installed, no such repo/revision/hookpoint, an incomplete download."""


def is_local(name_or_path, local: bool | None = None) -> bool:
    """Whether `name_or_path` means a local folder: always for a Path or with local=True; with local=None an existing
    folder wins over a hub name of the same spelling (as transformers' from_pretrained does)."""
    if local is not None:
        return local
    if isinstance(name_or_path, Path):
        return True
    text = str(name_or_path)
    return Path(text).expanduser().exists() or not looks_like_repo_id(text)


def looks_like_repo_id(text: str) -> bool:
    """`org/name` (or a bare `name`) in the Hub's alphabet, not a path spelling (./, /, ~, \\)."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None
            and not text.endswith((".", "/")) and ".." not in text)


def natural_key(name: str):
    """layers.2 before layers.10 (sparsify sorts hookpoints with natsort)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _huggingface_hub(name: str, also_path: bool):
    try:
        import huggingface_hub
    except ImportError:
        if also_path:
            raise HubError(f"{name}: no such folder (and huggingface_hub, needed to read it as a hub name, is not "
                           f"installed: {INSTALL_HINT})") from None
        raise HubError(f"loading from the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub


def _patterns(hookpoints, pattern, extra_files) -> list[str] | None:
    """allow_patterns for snapshot_download: only the requested hookpoint folders (None: the whole repo)."""
    if hookpoints is None and pattern is None:
        return None
    if hookpoints is not None:
        allow = [glob.escape(name) + "/*" for name in hookpoints]
    else:
        allow = [pattern + "/*"]
    return allow + list(extra_files)


def download(name: str, hookpoints: list[str] | None = None, *, pattern: str | None = None,
             revision: str | None = None, extra_files: tuple[str, ...] = (), also_path: bool = False) -> Path:
    """The local snapshot folder of hub repo `name` at `revision` holding (at least) the folders of `hookpoints`, or
    those matching `pattern`, or everything when both are None; `extra_files` are fetched too when they exist.
    `also_path`: `name` could have been a local folder too (the errors then say it is not one)."""
    hf = _huggingface_hub(name, also_path)
    from huggingface_hub import constants
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    where = name if revision is None else f"{name}@{revision}"
    if also_path:
        where += ": no such folder, and as a hub name"
    try:
        return Path(hf.snapshot_download(name, revision=revision,
                                         allow_patterns=_patterns(hookpoints, pattern, extra_files)))
    except GatedRepoError:
        raise HubError(f"{where}: a gated repo; accept its terms on huggingface.co and log in (hf auth login, or "
                       f"set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such model repo on the Hugging Face Hub (or it is private: log in with "
                       f"`hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{name}: no revision {revision!r} (a branch, tag or commit) in this repo") from None
    except LocalEntryNotFoundError as error:
        if type(error).__name__ == "IncompleteSnapshotError":
            raise HubError(f"{where}: the cached download is incomplete and the Hub cannot be reached "
                           f"({_first_line(error)}); download it again with network access") from None
        offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
        if offline:
            raise HubError(f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                           f"is set; download it once with network access, or unset HF_HUB_OFFLINE") from None
        raise HubError(f"{where}: cannot reach the Hugging Face Hub and it is not in the cache "
                       f"({constants.HF_HUB_CACHE}): {_first_line(error)}") from None
    except HfHubHTTPError as error:
        raise HubError(f"{where}: download failed: {_first_line(error)}") from None
    except ValueError as error:  # an invalid repo id or revision spelling (huggingface_hub's validators)
        raise HubError(f"{name}: not a valid hub repo name ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _listed_hookpoints(name: str, revision: str | None, snapshot: Path) -> tuple[list[str], str]:
    """(hookpoint folders of the repo, where that list comes from): the repo's file listing when huggingface_hub
    cached one (every online download does), else the folders of the local snapshot."""
    files = None
    try:
        import huggingface_hub

        cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)  # huggingface_hub >= 2.x
        if cached_tree is not None:
            files = [entry.path for entry in cached_tree(name, revision=snapshot.name)]
    except Exception:  # no listing cached (or an older layout): fall back to what is on disk
        files = None
    if files is not None:
        names = {path.rsplit("/", 1)[0] for path in files if path.endswith("/" + CONFIG_FILE)}
        return sorted(names, key=natural_key), "in the repo"
    names = [p.name for p in snapshot.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()]
    return sorted(names, key=natural_key), "in the local cache"


def _check_folder(name: str, hookpoint: str, folder: Path, weights_files: tuple[str, ...]) -> None:
    """A hookpoint folder of a snapshot must hold its config and its weights; a partial download is named as such."""
    has_cfg = (folder / CONFIG_FILE).is_file()
    has_weights = any((folder / w).is_file() for w in weights_files)
    if has_cfg and has_weights:
        return
    # a file whose blob never arrived is a dangling link in the snapshot: list only the readable ones
    present = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    missing = ([CONFIG_FILE] if not has_cfg else []) + ([" or ".join(weights_files)] if not has_weights else [])
    raise HubError(f"{name}: hookpoint {hookpoint!r} is only partly downloaded ({folder} lacks {', '.join(missing)}; "
                   f"holds {', '.join(present) or 'nothing'}); download it again with network access")


def hub_folders(name: str, hookpoints: list[str] | None = None, *, pattern: str | None = None,
                revision: str | None = None, weights_files: tuple[str, ...] = (WEIGHTS_FILE,),
                extra_files: tuple[str, ...] = (), also_path: bool = False) -> tuple[Path, dict[str, Path]]:
    """(snapshot folder, {hookpoint: local folder}) for hub repo `name`: the `hookpoints` asked for, else those
    matching `pattern`, else every hookpoint folder of the repo (natural order). Each folder is checked to hold
    cfg.json and one of `weights_files`; a missing hookpoint names the ones the repo has."""
    snapshot = download(name, hookpoints, pattern=pattern, revision=revision, extra_files=extra_files,
                        also_path=also_path)
    where = name if revision is None else f"{name}@{revision}"
    if hookpoints is not None:
        absent = [h for h in hookpoints if not (snapshot / h).is_dir()]
        if absent:
            listed, source = _listed_hookpoints(name, revision, snapshot)
            raise HubError(f"{where}: no hookpoint folder {', '.join(map(repr, absent))}; hookpoints {source}: "
                           f"{', '.join(listed) or 'none'}")
        names = sorted(hookpoints, key=natural_key)
    else:
        names = sorted((p.name for p in snapshot.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and (p / CONFIG_FILE).exists()), key=natural_key)
        if pattern is not None:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        if not names:
            what = f"matching {pattern!r}" if pattern is not None else f"(each holds {CONFIG_FILE} and weights)"
            raise HubError(f"{where}: no hookpoint folders {what}")
    folders = {n: snapshot / n for n in names}
    for n, folder in folders.items():
        _check_folder(name, n, folder, weights_files)
    return snapshot, folders


def hub_coder_folder(name: str, hookpoint: str | None = None, *, revision: str | None = None,
                     weights_files: tuple[str, ...] = (WEIGHTS_FILE,)) -> Path:
    """The local folder of one published coder: `hookpoint`'s folder of hub repo `name`, or the repo's root when it
    holds a single coder (sparsify's load_from_hub with hookpoint=None)."""
    if hookpoint is not None:
        _, folders = hub_folders(name, [hookpoint], revision=revision, weights_files=weights_files)
        return folders[hookpoint]
    snapshot = download(name, revision=revision)
    if not (snapshot / CONFIG_FILE).is_file():
        listed, source = _listed_hookpoints(name, revision, snapshot)
        raise HubError(f"{name}: no {CONFIG_FILE} at the repo's root; give a hookpoint (hookpoints {source}: "
                       f"{', '.join(listed) or 'none'})")
    _check_folder(name, "(root)", snapshot, weights_files)
    return snapshot


def local_folders(path, hookpoints: list[str] | None = None, *, pattern: str | None = None) -> dict[str, Path]:
    """{hookpoint: folder} of a local run folder: those in `hookpoints`, else those matching `pattern`, else all
    (natural order, as sparsify's load_many)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: run folder not found")
    names = sorted((p.name for p in path.iterdir() if (p / CONFIG_FILE).is_file()), key=natural_key)
    if hookpoints is not None:
        missing = [h for h in hookpoints if h not in names]
        if missing:
            raise CheckpointError(f"{path}: no hookpoint folder(s) {', '.join(missing)}; found {', '.join(names)}")
        names = [n for n in names if n in hookpoints]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if not names:
        raise CheckpointError(f"{path}: no hookpoint folders (each holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    return {n: path / n for n in names}


def coder_folders(name_or_path, hookpoints: list[str] | None = None, *, pattern: str | None = None,
                  revision: str | None = None, local: bool | None = None) -> dict[str, Path]:
    """{hookpoint: local folder} for `load_many`: a local run folder, or a hub repo (only the asked-for folders are
    downloaded). `local` as in sparsify's load_many; None decides by whether the folder exists."""
    if is_local(name_or_path, local):
        if revision is not None:
            raise UserError(f"{name_or_path}: revision= applies to hub names, not to a local folder")
        return local_folders(name_or_path, hookpoints, pattern=pattern)
    _, folders = hub_folders(str(name_or_path), hookpoints, pattern=pattern, revision=revision,
                             also_path=local is None)
    return folders


def resolve_source(src: str, hookpoints: list[str] | None = None, *, revision: str | None = None,
                   weights_files: tuple[str, ...] = (WEIGHTS_FILE,), extra_files: tuple[str, ...] = ()) -> Path:
    """For commands that take a folder (`sae convert SRC`, `sae eval RUN`): `src` itself when it exists locally or is
    spelled as a path, else the snapshot folder of hub repo `src` holding `hookpoints` (all when None)."""
    if is_local(src):
        return Path(src).expanduser()
    if hookpoints is None:
        snapshot = download(src, revision=revision, also_path=True)
        if (snapshot / CONFIG_FILE).is_file():
            _check_folder(src, "(root)", snapshot, weights_files)
        else:
            hub_folders(src, None, revision=revision, weights_files=weights_files)  # checks every folder
        return snapshot
    snapshot, _ = hub_folders(src, hookpoints, revision=revision, weights_files=weights_files,
                              extra_files=extra_files, also_path=True)
    return snapshot


def hub_run_model(src: str, folder: Path) -> str | None:
    """The model a hub repo's coders were trained on (the `model` of sparsify's run config.json beside them), or None
    for a local source (whose own run state names it)."""
    if is_local(src):
        return None
    path = Path(folder) / "config.json"
    try:
        model = json.loads(path.read_text()).get("model") if path.is_file() else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return model if isinstance(model, str) else None
