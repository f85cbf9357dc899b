"""The llama.cpp peer: llama-cpp-python in its own venv, measured with our protocol.

Standard library only, so the benchmark runner can import it without llama.cpp installed.
GGUFs come from llama.cpp's own tools: `convert_hf_to_gguf.py` (taken from the llama-cpp-python
sdist, run with our venv's torch) writes f16, then `llama_model_quantize` makes each variant.
Q4_0 is llama.cpp's fastest 4-bit CPU format here, Q8_0 its 8-bit one.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from common import VENVS, PeerError, bench_per_prompt, dir_mb, ensure_venv as _ensure_venv, last_line, run_child, run_measured

NAME = "llama.cpp"
VARIANTS = ["Q4_0", "Q8_0"]
CHILD = Path(__file__).resolve().with_name("llamacpp_child.py")
VERSION = "0.3.36"  # llama-cpp-python: the build measured and the converter it vendors, kept in step


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


def ensure_venv() -> Path:
    """VENVS/llamacpp with llama-cpp-python built from source (~9 min on 2 cores); its python."""
    return _ensure_venv("llamacpp", [["--no-cache-dir", f"llama-cpp-python=={VERSION}"]], check="import llama_cpp",
                        env={"CMAKE_ARGS": _cmake_args()})


def _converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its packages, unpacked from the llama-cpp-python sdist."""
    root = VENVS / f"llama.cpp-{VERSION}"
    if (root / "convert_hf_to_gguf.py").exists():
        return root
    dl = VENVS / "sdist"
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(dl)], capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerError(f"downloading the llama-cpp-python sdist failed: {last_line(r.stderr, True)}")
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = root.with_name(root.name + ".tmp")
    with tarfile.open(dl / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
        wanted = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                  m.name[len(prefix):].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        for m in wanted:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=wanted, filter="data")
    tmp.rename(root)
    return root


# All benchmark models carry SmolLM2's tokenizer; the converter recognises a tokenizer by a hash of
# its output, which transformers 5 changes, so name it ("smollm") instead of failing.
_CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_QUANTIZE = """
import ctypes, sys, llama_cpp
src, dst, ftype = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))
"""


def export(py: Path, hf_dir: Path, out: Path, variant: str) -> dict:
    """out (a .gguf) in `variant`, from hf_dir through an f16 GGUF; times and peaks of both steps."""
    out = Path(out)
    f16 = out.with_name(Path(hf_dir).name + ".f16.gguf")
    steps = []
    if not f16.exists():
        tmp = f16.with_suffix(".tmp")
        steps.append(run_measured([sys.executable, "-c", _CONVERT, _converter(), hf_dir, "--outtype", "f16",
                                   "--outfile", tmp]))
        tmp.rename(f16)
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        try:
            steps.append(run_measured([py, "-c", _QUANTIZE, f16, tmp, variant]))
        except PeerError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.rename(out)
    return {"artifact": str(out), "quant": variant, "artifact_mb": dir_mb(out),
            "export_s": sum(s["wall_s"] for s in steps) if steps else None,
            "export_peak_rss_mb": max(s["peak_rss_mb"] for s in steps) if steps else None}


def bench(py: Path, artifact, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
          threads: int) -> list[dict]:
    return bench_per_prompt(py, CHILD, artifact, prompts, decode_tokens, warmup, repeats, threads, NAME)


def logits(py: Path, artifact, ids: list[int], out_npy: Path, threads: int) -> None:
    run_child(py, CHILD, dict(artifact=str(artifact), mode="logits", threads=threads, ids=ids, out_npy=str(out_npy)),
              f"llama.cpp logits of {Path(artifact).name}")
