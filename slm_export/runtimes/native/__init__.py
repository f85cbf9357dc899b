"""The torch-free ExecuTorch runner: a small C++ library built on first use, called through ctypes.

The executorch wheel ships its C++ runtime (libexecutorch.so, the XNNPACK delegate, the optimized
and quantized kernels, headers and a CMake config) free of libtorch; only its Python bindings and
its LLM custom-op kernels link libtorch. `llama_ops.cpp` implements the two custom ops our .pte
files call, `runner.cpp` loads and runs a program, and this module compiles both against the wheel
once per (sources, executorch version, compiler) into a user cache, so that running a .pte costs
what it costs in an app, not an app plus PyTorch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import SlmExportError
from ...staging import user_cache_dir

SOURCES = ("runner.cpp", "llama_ops.cpp")
HEADERS = ("attention.h", "app_memory.h")
LIBS = ("executorch", "executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack",
        "executorch_threadpool")
# The definitions the wheel's CMake config (lib/cmake/executorch) says a consumer must compile with.
DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED", "ET_USE_THREADPOOL")
HERE = Path(__file__).parent
# How the runner is compiled; the C++ example an export carries is built the same way, so that it
# generates what `bench` and `verify` measured (`-march=native` is dropped where it cannot build).
CXXFLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17")


def _executorch_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise SlmExportError("running a .pte needs the executorch package: pip install executorch==1.5.1 "
                             "(with torch==2.13.0 installed first)")
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "include" / "executorch").is_dir() or not (root / "lib" / "libexecutorch.so").is_file():
        raise SlmExportError(f"the executorch package at {root} has no C++ runtime (include/ and lib/libexecutorch.so); "
                             "reinstall it: pip install --force-reinstall --no-deps executorch==1.5.1")
    return root


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx or not shutil.which(cxx):
        raise SlmExportError(
            "running a .pte builds slm-export's torch-free ExecuTorch runner once (two short C++ files) and needs a "
            "C++ compiler: install one (Debian/Ubuntu: apt install g++) or set CXX to its path")
    return cxx


def _command(cxx: str, root: Path, out: Path, native_flags: bool) -> list[str]:
    inc = root / "include"
    return [cxx, *(f for f in CXXFLAGS if native_flags or f != "-march=native"), "-shared", "-fPIC",
            *(f"-D{d}" for d in DEFINES), f"-I{inc}", f"-I{inc / 'executorch/runtime/core/portable_type/c10'}",
            *(str(HERE / s) for s in SOURCES), "-o", str(out), f"-L{root / 'lib'}",
            # registration-only libraries (kernels, the delegate) must stay linked though nothing names them
            "-Wl,--no-as-needed", *(f"-l{lib}" for lib in LIBS), "-Wl,--as-needed", f"-Wl,-rpath,{root / 'lib'}"]


def _cpu_flags() -> str:
    # Part of the cache key: a -march=native build must not be reused on another CPU (a shared home).
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def source_key(*parts: str) -> str:
    """A cache key over the C++ sources and `parts` (what else the build depends on)."""
    key = hashlib.sha256()
    for s in SOURCES + HEADERS:
        key.update((HERE / s).read_bytes())
    key.update("|".join(parts).encode())
    return key.hexdigest()[:16]


def build(root: Path, cxx: str, target: Path, native_flags: bool) -> Path:
    """Compile the runner against the executorch package at `root` into `target`, unless it is there.

    Built in a temp file and renamed into place, so two processes building at once both succeed."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        # -march=native makes the attention loops use this CPU's widest vectors; an old or odd
        # compiler that rejects it gets a portable build instead.
        for flags in ((True, False) if native_flags else (False,)):
            proc = subprocess.run(_command(cxx, root, out, flags), capture_output=True, text=True)
            if proc.returncode == 0:
                break
        else:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise SlmExportError(f"building the ExecuTorch runner with {cxx} failed:\n{tail}")
        os.replace(out, target)
    return target


@lru_cache(maxsize=1)
def library_path() -> Path:
    """The runner library for this machine, built first if this (sources, executorch, compiler) has none.

    $SLM_EXPORT_NATIVE_LIB names a library built elsewhere (the ARM emulation builds one for aarch64)."""
    from importlib import metadata

    prebuilt = os.environ.get("SLM_EXPORT_NATIVE_LIB")
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise SlmExportError(f"SLM_EXPORT_NATIVE_LIB={prebuilt} does not exist; unset it to build the runner here")
        return Path(prebuilt)
    root = _executorch_root()
    cxx = _compiler()
    key = source_key(metadata.version("executorch"), str(root), cxx, platform.machine(), _cpu_flags())
    return build(root, cxx, user_cache_dir() / "native" / key / "libslm_et.so", native_flags=True)


# ExecuTorch's own builds of kernels this library registers too (loaded by exporting, or by its Python
# bindings). ExecuTorch's operator registry aborts the process on a duplicate name.
_CONFLICTING = ("libcustom_ops_aot_lib", "libquantized_ops_aot_lib", "executorch/extension/pybindings/_C")


def _conflicts_in_this_process() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    return [name for name in _CONFLICTING if name in maps]


class NativeProgram:
    """A loaded .pte. `forward` appends tokens to the program's KV cache and returns the last one's
    logits; `logits` returns rows of what the last forward call appended (module.py's two methods,
    which share the cache). `method` is loaded now, the others on their first call."""

    def __init__(self, pte: Path, threads: int, vocab: int, method: str = "forward"):
        path = library_path()
        conflicts = _conflicts_in_this_process()
        if conflicts:
            raise SlmExportError(
                f"the torch-free ExecuTorch runner cannot load into a process that has loaded {conflicts[0]} (ExecuTorch's "
                "Python packages register the same kernels); open the runner without in_process=True, which runs it in "
                "a child process")
        lib = ctypes.CDLL(str(path))
        lib.slm_et_open.restype = ctypes.c_void_p
        lib.slm_et_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.slm_et_call.restype = ctypes.c_int
        lib.slm_et_call.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t]
        lib.slm_et_close.argtypes = [ctypes.c_void_p]
        self._lib, self.vocab = lib, vocab
        self._err = ctypes.create_string_buffer(2048)
        self._handle = lib.slm_et_open(str(pte).encode(), method.encode(), threads, self._err, len(self._err))
        if not self._handle:
            raise SlmExportError(f"{pte}: {self._err.value.decode(errors='replace')}")

    def forward(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """forward(tokens [1, n], input_pos [1]) -> the last token's logits [1, vocab]."""
        return self.call("forward", tokens, position, None, 1)

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """logits(rows [k]) -> [k, vocab]: rows of the tokens the last forward call appended."""
        return self.call("logits", None, 0, rows)

    def call(self, method: str, tokens: np.ndarray | None, position: int, rows: np.ndarray | None,
             out_rows: int | None = None) -> np.ndarray:
        """`method` with inputs (tokens, position) if tokens is given, then rows if given: [out_rows or
        len(rows), vocab] logits."""
        tokens = None if tokens is None else np.ascontiguousarray(tokens, dtype=np.int64)
        rows = None if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty((out_rows or rows.size, self.vocab), dtype=np.float32)
        rc = self._lib.slm_et_call(self._handle, method.encode(),
                                   None if tokens is None else tokens.ctypes.data, 0 if tokens is None else tokens.size,
                                   position, None if rows is None else rows.ctypes.data, 0 if rows is None else rows.size,
                                   out.ctypes.data, out.size, self._err, len(self._err))
        if rc:
            raise SlmExportError(f"the ExecuTorch runner failed: {self._err.value.decode(errors='replace')}")
        return out

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.slm_et_close(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
