"""The llama.cpp peer: llama-cpp-python in its own venv, measured with our protocol.

Standard library only, so the benchmark runner can import it without llama.cpp installed.
The measuring happens in `llamacpp_child.py`, run by the venv's python, one process per prompt
length (as our runner does), so each row's peak RSS is that process's own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).resolve().with_name("llamacpp_child.py")
PASSAGE = Path(__file__).resolve().parents[2] / "slm_export" / "data" / "passage.txt"


def _last_line(text: str, errors_only: bool = False) -> str:
    """The one line worth showing: the last (error) line of a tool's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] if errors_only else []
    return (errors or lines or ["(no output)"])[-1]


def _cmake_args() -> str:
    # Default native flags (-march=native) build a library that segfaults here, so name the ISA
    # explicitly; AVX-512 only if this CPU has it. AMX stays off (its kernels crashed too).
    flags = set(Path("/proc/cpuinfo").read_text().split())
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AMX_INT8=OFF"]
    if "avx512f" in flags:
        args.append("-DGGML_AVX512=ON")
        if "avx512_vnni" in flags:
            args.append("-DGGML_AVX512_VNNI=ON")
    return " ".join(args)


def ensure_venv(root: Path) -> Path:
    """root/llamacpp with llama-cpp-python built from source (~8 min on 2 cores); its python."""
    venv = Path(root).resolve() / "llamacpp"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        # Its own venv: llama-cpp-python pins numpy/jinja2 versions we must not impose on ours.
        ([sys.executable, "-m", "venv", str(venv)], {}),
        ([str(py), "-m", "pip", "install", "--no-cache-dir", "llama-cpp-python"], {"CMAKE_ARGS": _cmake_args()}),
    ]
    for cmd, env in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if r.returncode != 0:
            last = _last_line(r.stdout + r.stderr, errors_only=True)
            raise RuntimeError(f"llama.cpp venv: {' '.join(cmd[-3:])} failed: {last}")
    return py


_QUANTIZE = """
import ctypes, sys, llama_cpp
src, dst, ftype = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.allow_requantize = True  # the source is already 4-bit; llama.cpp refuses that unless told
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))
"""


def requantize(py: Path, src_gguf: Path, dst_gguf: Path, ftype: str = "Q4_0") -> None:
    """dst_gguf in `ftype`, re-quantized from src_gguf (the shipped Q4_1) by llama.cpp itself.

    Only a Q4_1 GGUF ships with the model; Q4_0 is llama.cpp's fastest 4-bit CPU format, so the peer
    gets both. Going through Q4_1 costs Q4_0 a little accuracy, not speed.
    """
    dst_gguf = Path(dst_gguf)
    if dst_gguf.exists():
        return
    dst_gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_gguf.with_suffix(".tmp.gguf")  # never leave a half-written file under the real name
    r = subprocess.run([str(py), "-c", _QUANTIZE, str(src_gguf), str(tmp), ftype], capture_output=True, text=True)
    if r.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp quantize to {ftype} failed (exit {r.returncode}): {_last_line(r.stderr)}")
    tmp.rename(dst_gguf)


def bench(py: Path, gguf: Path, prompt_tokens: list[int], decode_tokens: int, warmup: int, repeats: int,
          threads: int) -> list[dict]:
    """One row per prompt length, in BenchResult's keys plus sample_text and versions."""
    rows = []
    for p in prompt_tokens:
        cfg = dict(model=str(gguf), passage=str(PASSAGE), prompt_tokens=[p], decode_tokens=decode_tokens,
                   warmup=warmup, repeats=repeats, threads=threads)
        r = subprocess.run([str(py), str(CHILD), json.dumps(cfg)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp bench of {Path(gguf).name} failed (exit {r.returncode}): "
                               f"{_last_line(r.stderr)}")
        rows += json.loads(r.stdout)
    return rows
