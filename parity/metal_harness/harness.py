"""Run the Metal kernels of ``sae_mlx`` on Linux, where Metal does not exist.

Pipeline for one :class:`sae_mlx.kernels.sparse_rows.MetalLaunch` (the object the real ``*_metal`` call runs):

Design notes: docs/internals.md, section `parity/metal_harness/harness.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import mmap
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import ml_dtypes
import mlx.core as mx
import numpy as np

__all__ = [
    "HarnessError",
    "SignatureMismatch",
    "KernelFault",
    "Param",
    "ParsedKernel",
    "cache_dir",
    "compiler",
    "compiler_command",
    "compiler_missing",
    "capture_source",
    "capture_sources",
    "parse_kernel_source",
    "expected_signature",
    "check_signature",
    "compile_kernel",
    "run_launch",
    "run_many",
    "kernels_through_harness",
]

HARNESS_VERSION = "2"
SHIM_PATH = Path(__file__).with_name("shim.h")
CXXFLAGS = (
    "-std=c++20",
    "-O1",
    "-Wno-attributes",
    "-fPIC",
    "-shared",
    "-fno-strict-aliasing",
    # glibc's fortified longjmp refuses to jump from a fiber stack back to the launcher's stack
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=0",
)
# clang only: macOS marks the ucontext routines deprecated (they work; the fibers need them)
CLANG_FLAGS = ("-Wno-deprecated-declarations",)
# Extra flags for the harness build, split like a shell would (the CI's clang job uses it for macOS-like defines).
EXTRA_FLAGS_ENV = "SAE_METAL_HARNESS_CXXFLAGS"


def compiler() -> str:
    """The C++ compiler the harness builds with: ``$CXX`` if set; else ``clang++`` on macOS (where ``g++`` is
    Apple clang under another name anyway), ``g++`` elsewhere, or ``clang++`` when there is no ``g++``."""
    chosen = os.environ.get("CXX")
    if chosen:
        return chosen
    if sys.platform == "darwin":
        return "clang++"
    return "g++" if shutil.which("g++") or not shutil.which("clang++") else "clang++"


def compiler_missing() -> str | None:
    """None when :func:`compiler` can be run here, else why not (the parity suite's reason to skip the path)."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        install = "xcode-select --install" if sys.platform == "darwin" else "install g++ or clang++"
        return f"needs a C++20 compiler to build the Metal source here ({cxx!r} not found; {install}, or set CXX)"
    return None


@functools.lru_cache(maxsize=None)
def _is_clang(cxx: str) -> bool:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "clang" in out.lower()


def compiler_command() -> list[str]:
    """Compiler and flags (without input and output files) for one harness build."""
    cxx = compiler()
    flags = list(CXXFLAGS) + (list(CLANG_FLAGS) if _is_clang(cxx) else [])
    return [cxx, *flags, *shlex.split(os.environ.get(EXTRA_FLAGS_ENV, ""))]
MAX_THREADS_PER_THREADGROUP = 1024

# MLX's table of Metal attributes (mlx/backend/metal/custom_kernel.cpp), in its order: an attribute becomes a
# kernel parameter when its name occurs anywhere in the body.
MLX_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
# MLX arrays with fewer elements than this are passed in the `constant` address space.
MLX_MAX_CONSTANT_ARRAY_SIZE = 8

# MLX dtype name -> (type string MLX writes into the signature, NumPy dtype holding the same bytes)
_TYPES = {
    "float32": ("float", np.float32),
    "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),
    "int8": ("int8_t", np.int8),
    "int16": ("int16_t", np.int16),
    "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64),
    "uint8": ("uint8_t", np.uint8),
    "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32),
    "uint64": ("uint64_t", np.uint64),
    "bool": ("bool", np.bool_),
}

_CANARY = 0xA5
_UNWRITTEN = 0xFF


class HarnessError(RuntimeError):
    """The harness cannot run this launch (capture, unsupported feature, compilation)."""


class SignatureMismatch(HarnessError):
    """The source MLX generated does not have the signature the harness binds buffers by."""


class KernelFault(HarnessError):
    """The kernel misbehaved while running: out-of-bounds access, unwritten outputs, divergent barriers, ..."""


# ----------------------------------------------------------------------------------------------------------------
# Cache directory and locks
# ----------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("SAE_METAL_HARNESS_CACHE")
    path = Path(root) if root else Path(tempfile.gettempdir()) / f"sae-metal-harness-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# 1. Capture the generated source
# ----------------------------------------------------------------------------------------------------------------

_CAPTURE_SCRIPT = r"""
import ctypes, importlib.util, json, os, shutil, sys, tempfile

jobs = json.load(sys.stdin)
modules = {}
def launch_class(path):
    if path not in modules:
        name = "_sae_metal_capture_%d" % len(modules)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        modules[path] = mod
    return modules[path]

import mlx.core as mx
libc = ctypes.CDLL(None)
tmp = tempfile.mkdtemp(prefix="sae-metal-capture-")
for i, job in enumerate(jobs):
    libc.fflush(None)
    os.write(1, ("\n@@SAE-CAPTURE-BEGIN %d@@\n" % i).encode())
    try:
        cls = getattr(launch_class(job["module"]), job["cls"])
        launch = cls.from_description(job["desc"])
        def fn(*xs, launch=launch):
            return launch.with_inputs(xs).run(verbose=True)
        mx.export_function(os.path.join(tmp, "k%d.mlxfn" % i), fn, *launch.inputs)
    except Exception as e:  # MLX may refuse to finish the export; the source has been printed by then
        libc.fflush(None)
        os.write(1, ("\n@@SAE-CAPTURE-EXCEPTION %s: %s@@\n" % (type(e).__name__, e)).encode())
    libc.fflush(None)
    os.write(1, ("\n@@SAE-CAPTURE-END %d@@\n" % i).encode())
shutil.rmtree(tmp, ignore_errors=True)
"""

_GENERATED_RE = re.compile(r"Generated source code for `(?P<name>[^`]*)`:\n```\n(?P<src>.*?)\n```\n", re.S)


def _capture_job(launch) -> dict:
    cls = type(launch)
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if not path:
        raise HarnessError(f"cannot locate the module that defines {cls.__qualname__} for the capture subprocess")
    return {"module": str(Path(path).resolve()), "cls": cls.__qualname__, "desc": launch.describe()}


def _capture_key(desc: dict) -> str:
    return _sha(json.dumps(desc, sort_keys=True), mx.__version__, HARNESS_VERSION)


def _run_capture(jobs: list[dict]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _CAPTURE_SCRIPT],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    sources = []
    for i, job in enumerate(jobs):
        begin, end = f"\n@@SAE-CAPTURE-BEGIN {i}@@\n", f"\n@@SAE-CAPTURE-END {i}@@\n"
        b, e = out.find(begin), out.find(end)
        name = job["desc"]["spec"]["name"]
        if b < 0 or e < 0:
            raise HarnessError(
                f"the capture subprocess died before finishing kernel {name!r} (exit code {proc.returncode}).\n"
                f"stderr:\n{proc.stderr[-4000:]}"
            )
        block = out[b + len(begin) : e]
        found = list(_GENERATED_RE.finditer(block))
        if len(found) != 1:
            exc = re.search(r"@@SAE-CAPTURE-EXCEPTION (.*?)@@", block, re.S)
            raise HarnessError(
                f"expected MLX to print one generated source for kernel {name!r} under mx.export_function, "
                f"found {len(found)}"
                + (f"; the export raised {exc.group(1)}" if exc else "")
                + f".\nstderr:\n{proc.stderr[-4000:]}"
            )
        if found[0].group("name") != name:
            raise HarnessError(f"MLX printed the source of kernel {found[0].group('name')!r}, expected {name!r}")
        sources.append(found[0].group("src"))
    return sources


def capture_sources(launches: Sequence[Any]) -> list[str]:
    """The exact Metal source MLX generates for each launch (one subprocess for all launches not yet cached)."""
    jobs = [_capture_job(launch) for launch in launches]
    keys = [_capture_key(job["desc"]) for job in jobs]
    src_dir = cache_dir() / "src"
    src_dir.mkdir(exist_ok=True)
    paths = [src_dir / f"{key}.metal" for key in keys]
    if not all(p.exists() for p in paths):
        with _locked(cache_dir() / "capture.lock"):
            todo = {}
            for key, job, path in zip(keys, jobs, paths):
                if not path.exists():
                    todo.setdefault(key, (job, path))
            if todo:
                sources = _run_capture([job for job, _ in todo.values()])
                for (job, path), src in zip(todo.values(), sources):
                    _atomic_write(path, src)
    return [p.read_text() for p in paths]


def capture_source(launch) -> str:
    return capture_sources([launch])[0]


# ----------------------------------------------------------------------------------------------------------------
# 2. Parse and check the signature
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One kernel parameter as MLX writes it: ``[const ][space ]type[*|&] name [[binding]]``."""

    const: bool
    space: str | None  # "device" / "constant" for buffers, None for attributes
    type: str
    ref: str  # "*", "&" or "" (attributes)
    name: str
    binding: str  # "buffer(<i>)" or the attribute's own name

    def render(self) -> str:
        return (
            f"{'const ' if self.const else ''}{self.space + ' ' if self.space else ''}{self.type}{self.ref} "
            f"{self.name} [[{self.binding}]]"
        )

    @property
    def buffer_index(self) -> int | None:
        m = re.fullmatch(r"buffer\((\d+)\)", self.binding)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ParsedKernel:
    header: str
    template_params: tuple[tuple[str, str], ...]  # (kind, name): kind in typename / int / bool
    function_name: str
    params: tuple[Param, ...]
    body: str
    instantiation: tuple[str, ...] | None  # template arguments of the explicit instantiation, if any


_HEAD_RE = re.compile(r"(?:template <(?P<tparams>[^>\n]*)>\n)?\[\[kernel\]\] void (?P<fname>\w+)\(\n")
_PARAM_RE = re.compile(
    r"  (?P<const>const )?(?:(?P<space>device|constant|threadgroup|thread) )?(?P<type>\w+(?:<\w+>)?)"
    r"(?P<ref>[*&]?) (?P<name>\w+) \[\[(?P<binding>\w+(?:\(\d+\))?)\]\]"
)
_INST_RE = re.compile(
    r'\ntemplate \[\[host_name\("(?P<host>\w+)"\)\]\] \[\[kernel\]\] decltype\((?P<dname>\w+)<(?P<dargs>[^>]*)>\) '
    r"(?P<iname>\w+)<(?P<iargs>[^>]*)>;\n"
)


def parse_kernel_source(source: str, header: str = "") -> ParsedKernel:
    """Split an MLX-generated kernel source into header, template, signature, body and instantiation."""

    def bad(why: str) -> SignatureMismatch:
        return SignatureMismatch(f"cannot parse the kernel source MLX generated: {why}")

    if not source.startswith(header):
        raise bad("it does not start with the kernel's header")
    rest = source[len(header) :]
    head = _HEAD_RE.match(rest)
    if not head:
        raise bad(f"expected `[template <...>]\\n[[kernel]] void <name>(` after the header, found {rest[:120]!r}")
    tparams: tuple[tuple[str, str], ...] = ()
    if head.group("tparams") is not None:
        items = []
        for item in head.group("tparams").split(", "):
            kind, _, name = item.partition(" ")
            items.append((kind, name))
        tparams = tuple(items)
    sig_end = rest.find(") {\n", head.end())
    if sig_end < 0:
        raise bad("no `) {` closing the parameter list")
    params = []
    for line in rest[head.end() : sig_end].split(",\n"):
        m = _PARAM_RE.fullmatch(line)
        if not m:
            raise bad(f"unrecognised parameter line {line!r}")
        params.append(
            Param(
                const=bool(m.group("const")),
                space=m.group("space"),
                type=m.group("type"),
                ref=m.group("ref"),
                name=m.group("name"),
                binding=m.group("binding"),
            )
        )
    body_start = sig_end + len(") {\n")
    body_end = rest.rfind("\n}\n")
    if body_end < body_start:
        raise bad("no closing `}` of the kernel body")
    tail = rest[body_end + len("\n}\n") :]
    instantiation = None
    if tail:
        m = _INST_RE.fullmatch(tail)
        if not m:
            raise bad(f"unrecognised text after the kernel body: {tail[:200]!r}")
        fname = head.group("fname")
        if not (m.group("host") == m.group("dname") == m.group("iname") == fname):
            raise bad("the explicit instantiation names a different function than the kernel")
        if m.group("dargs") != m.group("iargs"):
            raise bad("the explicit instantiation's decltype and declarator disagree on the template arguments")
        instantiation = tuple(m.group("iargs").split(", ")) if m.group("iargs") else ()
    return ParsedKernel(
        header=header,
        template_params=tparams,
        function_name=head.group("fname"),
        params=tuple(params),
        body=rest[body_start:body_end],
        instantiation=instantiation,
    )


def _dtype_name(dt) -> str:
    return str(dt).rsplit(".", 1)[-1]


def _type_string(dtype_name: str) -> str:
    if dtype_name not in _TYPES:
        raise HarnessError(f"dtype {dtype_name} is not supported by the Metal harness")
    return _TYPES[dtype_name][0]


@dataclass(frozen=True)
class _Binding:
    """What the harness puts behind one expected parameter."""

    param: Param
    role: str  # input / shape / strides / ndim / output / attribute
    slot: int  # input or output number (-1 for attributes)


def expected_signature(launch) -> tuple[list[tuple[str, str]], list[str] | None, list[_Binding]]:
    """(template params, instantiation args or None, parameters) that MLX should generate for ``launch``."""
    spec = launch.spec
    body = spec.source
    tparams, targs = [], []
    for name, value in launch.template:
        if isinstance(value, mx.Dtype):
            tparams.append(("typename", name))
            targs.append(_type_string(_dtype_name(value)))
        elif isinstance(value, bool):
            tparams.append(("bool", name))
            targs.append("1" if value else "0")
        elif isinstance(value, int):
            tparams.append(("int", name))
            targs.append(str(int(value)))
        else:
            raise HarnessError(f"template arg {name!r}={value!r}: expected an mlx dtype, bool or int")
    out: list[_Binding] = []

    def buf(const, space, type_, ref, name, role, slot):
        out.append(_Binding(Param(const, space, type_, ref, name, f"buffer({len(out)})"), role, slot))

    for i, (name, arr) in enumerate(zip(spec.input_names, launch.inputs)):
        space = "constant" if arr.size < MLX_MAX_CONSTANT_ARRAY_SIZE else "device"
        buf(True, space, _type_string(_dtype_name(arr.dtype)), "&" if arr.ndim == 0 else "*", name, "input", i)
        if arr.ndim > 0:
            if f"{name}_shape" in body:
                buf(True, "constant", "int", "*", f"{name}_shape", "shape", i)
            if f"{name}_strides" in body:
                buf(True, "constant", "int64_t", "*", f"{name}_strides", "strides", i)
            if f"{name}_ndim" in body:
                buf(True, "constant", "int", "&", f"{name}_ndim", "ndim", i)
    for i, (name, dt) in enumerate(zip(spec.output_names, launch.output_dtypes)):
        t = _type_string(_dtype_name(dt))
        buf(False, "device", f"atomic<{t}>" if spec.atomic_outputs else t, "*", name, "output", i)
    for attr, type_ in MLX_ATTRIBUTES:
        if attr in body:
            out.append(_Binding(Param(False, None, type_, "", attr, attr), "attribute", -1))
    return tparams, (targs if tparams else None), out


def check_signature(parsed: ParsedKernel, launch) -> list[_Binding]:
    """Raise :class:`SignatureMismatch` unless ``parsed`` is exactly what the harness expects for ``launch``;
    return the bindings (which buffer/attribute goes to each parameter)."""
    spec = launch.spec
    if len(spec.input_names) != len(launch.inputs) or len(spec.output_names) != len(launch.output_dtypes):
        raise HarnessError("the launch's inputs/outputs do not match its spec's input_names/output_names")
    tparams, targs, bindings = expected_signature(launch)
    problems = []
    prefix = f"custom_kernel_{spec.name}"
    if not parsed.function_name.startswith(prefix):
        problems.append(f"function name: expected it to start with `{prefix}`, generated `{parsed.function_name}`")
    if list(parsed.template_params) != tparams:
        problems.append(f"template parameters: expected {tparams}, generated {list(parsed.template_params)}")
    inst = list(parsed.instantiation) if parsed.instantiation is not None else None
    if inst != targs:
        problems.append(f"template instantiation: expected <{', '.join(targs or [])}>, generated {inst}")
    exp_params = [b.param for b in bindings]
    for i in range(max(len(exp_params), len(parsed.params))):
        e = exp_params[i].render() if i < len(exp_params) else "(none)"
        g = parsed.params[i].render() if i < len(parsed.params) else "(none)"
        if e != g:
            problems.append(f"parameter {i}: expected `{e}`, generated `{g}`")
    if parsed.body != spec.source:
        problems.append("the body is not the kernel's source verbatim")
    if problems:
        raise SignatureMismatch(
            f"the source MLX {mx.__version__} generated for kernel {spec.name!r} does not match the signature the "
            "Metal harness binds buffers by:\n  "
            + "\n  ".join(problems)
            + "\nIf MLX changed how metal_kernel writes signatures, update parity/metal_harness/harness.py "
            "(expected_signature) after checking the new binding rules; otherwise the launch or the source is wrong."
        )
    return bindings


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def _check_supported(launch, parsed: ParsedKernel) -> None:
    if launch.spec.atomic_outputs:
        raise HarnessError("atomic outputs are not supported by shim.h (no kernel of ours uses them)")
    code = _strip_comments(parsed.header + "\n" + parsed.body)
    if re.search(r"\bthreadgroup\b(?!_)", code):
        raise HarnessError(
            "the kernel uses the `threadgroup` address space (threadgroup memory); shim.h defines the word away "
            "and does not emulate group-shared memory (no kernel of ours uses it)"
        )


def _is_cooperative(parsed: ParsedKernel) -> bool:
    code = _strip_comments(parsed.header + "\n" + parsed.body)
    return bool(re.search(r"\bsimd_\w+|\bquad_\w+|\bsimdgroup_barrier\b|\bthreadgroup_barrier\b", code))


# ----------------------------------------------------------------------------------------------------------------
# 3. Driver and compilation
# ----------------------------------------------------------------------------------------------------------------


def _without_instantiation(source: str) -> str:
    """``source`` minus MLX's explicit instantiation line (``template [[host_name(..)]] [[kernel]] decltype(..)
    name<..>;``): clang rejects attributes there ("an attribute list cannot appear here"; g++ only warns), and
    the driver's call of ``name<args>`` instantiates the same specialisation anyway."""
    stripped, count = _INST_RE.subn("\n", source)
    if count > 1:
        raise SignatureMismatch(f"expected at most one explicit instantiation in the generated source, found {count}")
    return stripped


def _driver_source(parsed: ParsedKernel, source: str) -> str:
    source = _without_instantiation(source)
    args = []
    for p in parsed.params:
        i = p.buffer_index
        if i is None:
            args.append(f"a.{p.name}")
            continue
        t = f"{'const ' if p.const else ''}{p.type}"
        cast = f"static_cast<{t}*>(g_bufs[{i}])"
        args.append(f"*{cast}" if p.ref == "&" else cast)
    callee = parsed.function_name
    if parsed.instantiation is not None:
        callee += f"<{', '.join(parsed.instantiation)}>"
    joined = ",\n      ".join(args)
    return f"""// Generated by parity/metal_harness/harness.py (version {HARNESS_VERSION}). Do not edit.
#include "shim.h"
#line 1 "mlx-generated-kernel.metal"
{source}
#line 1 "metal-harness-driver.cpp"
static void** g_bufs = nullptr;
static void sae_call([[maybe_unused]] const sae_shim::Attrs& a) {{
  {callee}(
      {joined});
}}
extern "C" int sae_run(void** bufs, const unsigned* grid, const unsigned* tg, int cooperative) {{
  g_bufs = bufs;
  return sae_shim::run(grid, tg, cooperative, &sae_call);
}}
extern "C" const char* sae_error() {{ return sae_shim::rt().error; }}
extern "C" void* sae_fault_address() {{ return sae_shim::rt().fault_addr; }}
"""


_LIBS: dict[str, ctypes.CDLL] = {}
# One launch at a time per process: the runtime state in each library and the SIGSEGV handler are process-wide,
# and ctypes releases the GIL during the call.
_RUN_LOCK = threading.Lock()


def compile_kernel(parsed: ParsedKernel, source: str) -> Path:
    """Compile the driver for ``source`` into a cached shared library; return its path."""
    driver = _driver_source(parsed, source)
    shim = SHIM_PATH.read_text()
    command = compiler_command()
    key = _sha(driver, shim, " ".join(command), HARNESS_VERSION)
    lib_dir = cache_dir() / "lib"
    lib_dir.mkdir(exist_ok=True)
    lib = lib_dir / f"{key}.so"
    if lib.exists():
        return lib
    with _locked(lib_dir / f"{key}.lock"):
        if lib.exists():
            return lib
        cpp = lib_dir / f"{key}.cpp"
        _atomic_write(cpp, driver)
        tmp = lib_dir / f".{key}.{os.getpid()}.so"
        cmd = [*command, "-I", str(SHIM_PATH.parent), "-o", str(tmp), str(cpp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except FileNotFoundError as e:
            raise HarnessError(f"the Metal harness needs a C++20 compiler ({command[0]!r} not found; set CXX)") from e
        if proc.returncode != 0:
            raise HarnessError(
                f"{command[0]} could not compile the MLX-generated kernel behind shim.h ({cpp}); the kernel probably "
                f"uses MSL that shim.h does not provide:\n{proc.stderr[-6000:]}"
            )
        os.replace(tmp, lib)
    return lib


def _load(path: Path) -> ctypes.CDLL:
    key = str(path)
    if key not in _LIBS:
        lib = ctypes.CDLL(key)
        lib.sae_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint),
                                ctypes.POINTER(ctypes.c_uint), ctypes.c_int]
        lib.sae_run.restype = ctypes.c_int
        lib.sae_error.restype = ctypes.c_char_p
        lib.sae_fault_address.restype = ctypes.c_void_p
        _LIBS[key] = lib
    return _LIBS[key]


# ----------------------------------------------------------------------------------------------------------------
# 4. Buffers and execution
# ----------------------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE = 0


class _Guarded:
    """``nbytes`` bytes that end exactly where a PROT_NONE guard page begins, with canary bytes before them (up
    to the start of their page) and another guard page before that."""

    def __init__(self, name: str, nbytes: int):
        page = mmap.PAGESIZE
        self.name = name
        self.nbytes = nbytes
        pages = max(1, -(-nbytes // page))
        self.mm = mmap.mmap(-1, (pages + 2) * page)
        start = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.base = start + page
        self.guard = self.base + pages * page
        self.guard_len = page
        self.lead_guard = start
        for addr in (start, self.guard):
            if _libc.mprotect(addr, page, _PROT_NONE) != 0:
                raise HarnessError(f"mprotect failed (errno {ctypes.get_errno()})")
        self.offset = pages * page - nbytes
        self.region = np.frombuffer(self.mm, dtype=np.uint8, count=pages * page, offset=page)
        self.region[: self.offset] = _CANARY
        self.data = self.region[self.offset :]
        self.addr = self.base + self.offset

    def canary_intact(self) -> bool:
        return bool(np.all(self.region[: self.offset] == _CANARY))


def _mlx_to_numpy(a: mx.array) -> np.ndarray:
    name = _dtype_name(a.dtype)
    if name not in _TYPES:
        raise HarnessError(f"input dtype {name} is not supported by the Metal harness")
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    arr = np.ascontiguousarray(np.array(a))
    return arr.astype(_TYPES[name][1], copy=False)


def _init_bytes(dtype_name: str, shape: tuple, value: float) -> np.ndarray:
    if dtype_name == "bfloat16":
        return np.full(shape, value, dtype=ml_dtypes.bfloat16).view(np.uint16)
    return np.full(shape, value, dtype=_TYPES[dtype_name][1])


def _execute(lib: ctypes.CDLL, bindings: list[_Binding], cooperative: bool, launch, check_unwritten: bool):
    spec = launch.spec
    grid = [int(g) for g in launch.grid]
    tg = [int(t) for t in launch.threadgroup]
    if len(grid) != 3 or len(tg) != 3 or min(grid) < 1 or min(tg) < 1:
        raise HarnessError(f"grid {grid} and threadgroup {tg} must be three positive sizes each")
    if tg[0] * tg[1] * tg[2] > MAX_THREADS_PER_THREADGROUP:
        raise KernelFault(
            f"threadgroup {tuple(tg)} has {tg[0] * tg[1] * tg[2]} threads; Metal allows at most "
            f"{MAX_THREADS_PER_THREADGROUP} (MLX raises before dispatch)"
        )
    inputs = [_mlx_to_numpy(a) for a in launch.inputs]
    buffers: list[_Guarded] = []
    checks = []  # (guarded buffer, kind, payload)
    outputs: list[tuple[_Guarded, str, tuple]] = []
    for b in bindings:
        if b.role == "attribute":
            continue
        name = b.param.name
        if b.role == "input":
            arr = inputs[b.slot]
            content = arr.reshape(-1).view(np.uint8)
            kind = "input"
        elif b.role == "shape":
            content = np.asarray(inputs[b.slot].shape, dtype=np.int32).view(np.uint8)
            kind = "meta"
        elif b.role == "strides":
            arr = inputs[b.slot]
            strides = [s // arr.itemsize for s in arr.strides]
            content = np.asarray(strides, dtype=np.int64).view(np.uint8)
            kind = "meta"
        elif b.role == "ndim":
            content = np.asarray([inputs[b.slot].ndim], dtype=np.int32).view(np.uint8)
            kind = "meta"
        else:  # output
            shape = tuple(int(s) for s in launch.output_shapes[b.slot])
            dname = _dtype_name(launch.output_dtypes[b.slot])
            itemsize = np.dtype(_TYPES[dname][1]).itemsize
            count = int(np.prod(shape, dtype=np.int64))
            g = _Guarded(name, count * itemsize)
            if launch.init_value is None:
                g.data[:] = _UNWRITTEN
            else:
                g.data[:] = _init_bytes(dname, shape, launch.init_value).reshape(-1).view(np.uint8)
            buffers.append(g)
            outputs.append((g, dname, shape))
            continue
        g = _Guarded(name, content.size)
        g.data[:] = content
        buffers.append(g)
        checks.append((g, kind, content.copy()))
    addrs = (ctypes.c_void_p * max(1, len(buffers)))(*[g.addr for g in buffers])
    grid_c = (ctypes.c_uint * 3)(*grid)
    tg_c = (ctypes.c_uint * 3)(*tg)
    with _RUN_LOCK:
        rc = lib.sae_run(addrs, grid_c, tg_c, 1 if cooperative else 0)
        message = (lib.sae_error() or b"").decode(errors="replace")
        fault = lib.sae_fault_address() or 0
    if rc != 0:
        if rc == 1:
            where = f"at address {fault:#x}, which is in no buffer of this launch"
            for g in buffers:
                if g.guard <= fault < g.guard + g.guard_len:
                    where = f"{fault - g.guard} bytes past the end of buffer {g.name!r} ({g.nbytes} bytes)"
                    break
                if g.lead_guard <= fault < g.lead_guard + g.guard_len:
                    where = f"{g.addr - fault} bytes before the start of buffer {g.name!r} ({g.nbytes} bytes)"
                    break
            raise KernelFault(f"kernel {spec.name!r}: out-of-bounds access {where} ({message})")
        raise KernelFault(f"kernel {spec.name!r}: {message}")
    for g in buffers:
        if not g.canary_intact():
            raise KernelFault(f"kernel {spec.name!r} wrote before the start of buffer {g.name!r}")
    for g, kind, content in checks:
        if not np.array_equal(g.data, content):
            raise KernelFault(f"kernel {spec.name!r} modified its {kind} buffer {g.name!r}")
    results = []
    for g, dname, shape in outputs:
        np_dtype = _TYPES[dname][1]
        arr = g.data.view(np_dtype).reshape(shape).copy()
        if check_unwritten and launch.init_value is None:
            itemsize = np.dtype(np_dtype).itemsize
            untouched = np.all(g.data.reshape(-1, itemsize) == _UNWRITTEN, axis=1) if arr.size else np.zeros(0, bool)
            if untouched.any():
                first = int(np.argmax(untouched))
                pos = tuple(int(v) for v in np.unravel_index(first, shape))
                raise KernelFault(
                    f"kernel {spec.name!r} left {int(untouched.sum())} of {arr.size} elements of output {g.name!r} "
                    f"unwritten (first at position {pos}); without init_value they would hold garbage on Metal"
                )
        if dname == "bfloat16":
            arr = arr.view(ml_dtypes.bfloat16)
        results.append(arr)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def _prepare(launch, source: str):
    parsed = parse_kernel_source(source, launch.spec.header)
    bindings = check_signature(parsed, launch)
    _check_supported(launch, parsed)
    return parsed, bindings


def run_launch(launch, *, source: str | None = None, check_unwritten: bool = True) -> list[np.ndarray]:
    """Run ``launch`` (a ``MetalLaunch``) through the harness and return its outputs as NumPy arrays.

    ``source`` replaces the captured MLX source (to test the signature check); ``check_unwritten`` (default on)
    fails when a launch without ``init_value`` leaves output elements unwritten."""
    if source is None:
        source = capture_source(launch)
    parsed, bindings = _prepare(launch, source)
    lib = _load(compile_kernel(parsed, source))
    return _execute(lib, bindings, _is_cooperative(parsed), launch, check_unwritten)


def run_many(launches: Iterable[Any], *, check_unwritten: bool = True) -> list[list[np.ndarray]]:
    """:func:`run_launch` for several launches: one capture subprocess, compilations in parallel."""
    launches = list(launches)
    sources = capture_sources(launches)
    prepared = [_prepare(launch, src) for launch, src in zip(launches, sources)]
    first = {}  # one compilation per distinct source
    for i, src in enumerate(sources):
        first.setdefault(src, i)
    with ThreadPoolExecutor(max_workers=max(1, min(len(first), os.cpu_count() or 1))) as pool:
        built = dict(zip(first, pool.map(lambda i: compile_kernel(prepared[i][0], sources[i]), first.values())))
    libs = [built[src] for src in sources]
    return [
        _execute(_load(lib), bindings, _is_cooperative(parsed), launch, check_unwritten)
        for lib, (parsed, bindings), launch in zip(libs, prepared, launches)
    ]


def _to_mlx(arr: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(np.ascontiguousarray(arr).view(np.uint16)).view(mx.bfloat16)
    return mx.array(arr)


@contextlib.contextmanager
def kernels_through_harness():
    """Inside this context the sparse-row dispatchers of ``sae_mlx`` take their Metal path (whatever ``SAE_EAGER``
    and the device say) and every :meth:`MetalLaunch.run` executes in this harness instead of on Metal, so a whole
    forward/backward of an MLX model runs the kernel bodies Metal would run. Yields the list of kernel names run,
    in order. Eager use only: the harness reads array values, which ``mx.compile`` tracing cannot provide."""
    from sae_mlx.kernels import sparse_rows as sr

    ran: list[str] = []
    old_use_metal, old_run = sr.use_metal, sr.MetalLaunch.run

    def run_in_harness(self, verbose: bool = False):
        try:
            outputs = run_launch(self)
        except ValueError as e:
            if "function transformations" not in str(e):
                raise
            raise HarnessError(f"the Metal harness cannot run inside mx.compile / vmap tracing: {e}") from e
        ran.append(self.spec.name)
        return [_to_mlx(arr, dt) for arr, dt in zip(outputs, self.output_dtypes)]

    sr.use_metal = lambda: True
    sr.MetalLaunch.run = run_in_harness
    try:
        yield ran
    finally:
        sr.use_metal = old_use_metal
        sr.MetalLaunch.run = old_run
