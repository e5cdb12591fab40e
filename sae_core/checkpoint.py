"""Framework-free checkpoint I/O in sparsify's layout (docs/SPEC.md section 1): validation, atomic writes, NumPy access.

A checkpoint is a folder holding `cfg.json` and `sae.safetensors`. Both backends validate through
`validate_checkpoint` before they read tensors with their own safetensors loader, so every bad file gives the
same clear error whichever framework opens it.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .config import SparseCoderConfig, config_to_json
from .errors import CheckpointError

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# safetensors dtype names -> NumPy dtypes (bf16 through ml_dtypes, imported only when a bf16 tensor is met)
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _numpy_dtype(name: str):
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _NUMPY_DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {name}")
    return np.dtype(_NUMPY_DTYPES[name])


def _safetensors_name(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "BF16"
    for name, candidate in _NUMPY_DTYPES.items():
        if np.dtype(candidate) == dtype:
            return name
    raise CheckpointError(f"cannot store NumPy dtype {dtype} in safetensors")


def expected_shapes(cfg: SparseCoderConfig, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    num_latents = cfg.num_latents_for(d_in)
    shapes = {
        "encoder.weight": (num_latents, d_in),
        "encoder.bias": (num_latents,),
        "W_dec": (num_latents, d_out),
        "b_dec": (d_out,),
    }
    if cfg.skip_connection:
        shapes["W_skip"] = (d_out, d_in)
    return shapes


def read_json(path: Path, what: str, error=CheckpointError):
    """Parse a JSON file of ours or of a download; every way it can be malformed gives `error` naming the file
    (a file nested 200,000 deep makes the parser raise RecursionError: that too)."""
    path = Path(path)
    try:
        return parse_json(path.read_bytes(), f"{path}", what, error)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or type(e).__name__})") from None


def parse_json(raw: bytes | str, where: str, what: str, error=CheckpointError):
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{where}: not {what} (not UTF-8 text)") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise error(f"{where}: not {what} (invalid JSON: {str(e)[:120]})") from None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse a safetensors header: ({name: {"dtype", "shape", "data_offsets"}}, metadata).

    Checks everything a loader would otherwise report cryptically or, worse, accept: not a safetensors file,
    truncated data, shapes that are not lists of non-negative integers, and byte ranges that overlap, leave gaps or
    stop short of the end of the file (the safetensors format requires the tensors to tile the data exactly;
    overlapping ranges would make two tensors share bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header length {header_len} "
                                  f"does not fit in {size} bytes)")
        raw = f.read(header_len)
    header = parse_json(raw.rstrip(b" "), str(path), "a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: malformed __metadata__ (expected a JSON object of strings)")
    data_len = size - 8 - header_len
    ranges = []
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            shape = info["shape"]
            if not (_is_count(start) and _is_count(end) and isinstance(shape, list)
                    and all(_is_count(n) for n in shape)):
                raise TypeError
            count = math.prod(shape)
            item = 2 if info["dtype"] in ("BF16", "F16", "I16") else _numpy_dtype(info["dtype"]).itemsize
        except (KeyError, TypeError, ValueError, CheckpointError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r} (shape and "
                                  f"data_offsets must be lists of non-negative integers)") from None
        if end - start != count * item:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {info['shape']}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} needs bytes up to {end} "
                                  f"but the file holds {data_len} bytes of data; re-save or re-download it")
        ranges.append((start, end, name))
    position = 0
    for start, end, name in sorted(ranges):
        if start != position:
            problem = "overlaps the previous tensor's bytes" if start < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {start}, which {problem}: a corrupt "
                                  f"or crafted file (safetensors tensors tile the data exactly); re-download it")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path}: {data_len - position} trailing bytes after the last tensor: a corrupt or "
                              f"crafted file; re-save or re-download it")
    return header, metadata


def load_config(folder: Path) -> tuple[SparseCoderConfig, int, int]:
    """Read `cfg.json` of a checkpoint folder: (config, d_in, d_out)."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    data = read_json(path, "a JSON object")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if "d_in" not in data:
        raise CheckpointError(f"{path}: no 'd_in' key (sparsify writes it beside the config fields)")
    cfg = SparseCoderConfig.from_dict(data, where=str(path))
    d_in = data["d_in"]
    d_out = data.get("d_out", d_in)
    cfg.validate(d_in, d_out, where=str(path))
    return cfg, d_in, d_out


def validate_checkpoint(folder: Path) -> tuple[SparseCoderConfig, int, int, dict[str, dict]]:
    """Check a checkpoint folder without loading its tensors: (config, d_in, d_out, header).

    Errors name the file and the problem: missing or extra tensor, wrong shape, a bad config, a truncated or
    non-safetensors file. Non-finite values are checked by `check_finite` once tensors are loaded.
    """
    cfg, d_in, d_out = load_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    header, _ = read_header(path)
    expected = expected_shapes(cfg, d_in, d_out)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing)} required by its {CONFIG_FILE}")
    if extra:
        hint = " (skip_connection is false in cfg.json)" if extra == ["W_skip"] else ""
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(extra)}{hint}")
    for name, shape in expected.items():
        if tuple(header[name]["shape"]) != shape:
            m = shape[0] if name != 'b_dec' else cfg.num_latents_for(d_in)
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(header[name]['shape'])}, but "
                                  f"{CONFIG_FILE} (d_in={d_in}, d_out={d_out}, M={m}) "
                                  f"implies {shape}")
        if header[name]["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {header[name]['dtype']}, expected a float type")
    return cfg, d_in, d_out, header


def weights_dtype(header: dict[str, dict]) -> str:
    """The safetensors dtype both backends load a checkpoint's tensors as, casting each tensor to it: the file's
    own when every tensor has the same one of F32, BF16, F16; else F32. F64 files become F32 (no backend computes in
    float64 and Metal has no float64; values beyond float32's range turn into Inf and are refused by
    `check_finite`), and mixed files (say F16 weights with an F32 bias, which would fail inside forward) become the
    one dtype that holds all of them exactly."""
    dtypes = {info["dtype"] for info in header.values()}
    if len(dtypes) == 1 and dtypes <= {"F32", "BF16", "F16"}:
        return dtypes.pop()
    return "F32"


def load_weights_cast(folder: Path, header: dict[str, dict]) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as NumPy arrays already cast to `weights_dtype(header)`: for loaders that cannot read
    a dtype in the file themselves (MLX's safetensors reader has no F64)."""
    tensors, _ = load_safetensors_numpy(Path(folder) / WEIGHTS_FILE)
    target = _numpy_dtype(weights_dtype(header))
    with np.errstate(over="ignore"):  # beyond float32's range becomes Inf, which check_finite then refuses
        return {name: value.astype(target) for name, value in tensors.items()}


def check_finite(folder: Path, name: str, finite: bool) -> None:
    if not finite:
        raise CheckpointError(f"{Path(folder) / WEIGHTS_FILE}: tensor {name!r} contains NaN or Inf values; "
                              f"this checkpoint is corrupt (restore an earlier one)")


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on failure it is removed.

    A crash or Ctrl-C while writing leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; give a normal file's permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        as_os_error = _write_failure(error, path)
        if as_os_error is not None:
            raise as_os_error from error
        raise


def _write_failure(error: BaseException, path: Path) -> OSError | None:
    """The OSError behind a framework's failed write, which safetensors (Rust: "... (os error 28)") and MLX
    ("[write] Unable to write N bytes") report as their own exception types; None for anything else."""
    if isinstance(error, OSError) or not isinstance(error, Exception):
        return None
    text = str(error)
    found = re.search(r"os error (\d+)", text)
    if found:
        number = int(found.group(1))
        return OSError(number, os.strerror(number), str(path))
    if "Unable to write" in text:
        return OSError(errno.EIO, f"{text.strip()} (a full disk or a file-size limit does this)", str(path))
    return None


# ---- folders built beside their destination and renamed into place (sae harvest, sae convert) ----

_STAGING_LOCKS: dict[str, int] = {}  # staging folder -> the fd holding its flock, in this process
STALE_AFTER_S = 10.0  # an unlocked staging folder younger than this may be one another process is just locking


def staging_pattern(dst: Path, suffix: str) -> re.Pattern:
    """Names of the staging folders `make_staging_dir(dst, suffix)` makes (tempfile.mkdtemp's 8 random chars)."""
    return re.compile(rf"\.{re.escape(Path(dst).name)}\.[A-Za-z0-9_]{{8}}\.{re.escape(suffix)}")


def make_staging_dir(dst: Path, suffix: str = "partial") -> Path:
    """A fresh hidden folder `.<name>.XXXXXXXX.<suffix>` beside `dst`, flock-ed by this process until it exits or
    `release_staging_dir`. Stale ones of the same pattern (left by a killed process: no one holds their lock)
    are removed first, so a SIGKILLed harvest or convert does not leave its partial output behind for good."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dst, suffix)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=f".{suffix}", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    fd = os.open(staging, os.O_RDONLY)
    if _lock_fd(fd) is False:  # just made by us: only a bug could make this fail
        os.close(fd)
        raise RuntimeError(f"{staging}: could not lock a fresh staging folder")
    _STAGING_LOCKS[str(staging)] = fd
    return staging


def release_staging_dir(staging: Path) -> None:
    """Drop the lock of a staging folder made here (after it was renamed into place or removed)."""
    fd = _STAGING_LOCKS.pop(str(staging), None)
    if fd is not None:
        os.close(fd)


def _lock_fd(fd: int) -> bool | None:
    """flock(LOCK_EX | LOCK_NB): True when taken, False when another process holds it, None without fcntl."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def remove_stale_staging(dst: Path, suffix: str = "partial") -> list[Path]:
    """Remove staging folders of `dst` that no live process holds: only real folders whose names match our
    pattern (never through a symbolic link), older than STALE_AFTER_S. Returns what was removed."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    pattern, removed = staging_pattern(dst, suffix), []
    for entry in os.scandir(dst.parent):
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        if str(Path(entry.path)) in _STAGING_LOCKS or time.time() - entry.stat(follow_symlinks=False).st_mtime \
                < STALE_AFTER_S:
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _lock_fd(fd) is True:  # no one holds it: its writer is gone (without fcntl: never removed)
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_config(folder: Path, cfg: SparseCoderConfig, d_in: int, d_out: int) -> None:
    cfg.validate(d_in, d_out)
    write_text_atomic(Path(folder) / CONFIG_FILE, config_to_json(cfg, d_in, d_out))


# ---- NumPy access (conversion, the oracle, tools that need no framework) ----

def load_safetensors_numpy(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    header, metadata = read_header(path)
    offset = 8 + struct.unpack("<Q", Path(path).open("rb").read(8))[0]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = np.array(data[offset + start: offset + end])
        tensors[name] = raw.view(_numpy_dtype(info["dtype"])).reshape(info["shape"])
    return tensors, metadata


def save_safetensors_numpy(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write a safetensors file from NumPy arrays (bf16 via ml_dtypes), atomically."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        raw = array.tobytes()
        header[name] = {"dtype": _safetensors_name(array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for chunk in chunks:
            f.write(chunk)


def load_checkpoint_numpy(folder: Path) -> tuple[SparseCoderConfig, int, int, dict[str, np.ndarray]]:
    cfg, d_in, d_out, _ = validate_checkpoint(folder)
    tensors, _ = load_safetensors_numpy(Path(folder) / WEIGHTS_FILE)
    for name, value in tensors.items():
        with np.errstate(over="ignore"):  # an F64 value beyond float32's range: Inf, refused
            check_finite(folder, name, bool(np.isfinite(value.astype(np.float32)).all()))
    return cfg, d_in, d_out, tensors


def save_checkpoint_numpy(folder: Path, cfg: SparseCoderConfig, d_in: int, d_out: int,
                          tensors: dict[str, np.ndarray]) -> None:
    expected = expected_shapes(cfg, d_in, d_out)
    if set(tensors) != set(expected) or any(tuple(tensors[n].shape) != s for n, s in expected.items()):
        got = {n: tuple(t.shape) for n, t in tensors.items()}
        raise CheckpointError(f"tensors {got} do not match the config, which implies {expected}")
    save_safetensors_numpy(Path(folder) / WEIGHTS_FILE, {n: tensors[n] for n in expected})
    write_config(folder, cfg, d_in, d_out)
