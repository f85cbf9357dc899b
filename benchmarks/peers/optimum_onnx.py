"""The optimum-onnx peer: Hugging Face's own ONNX export, run with onnxruntime, measured with our protocol.

Standard library only, so the benchmark runner can import it without optimum installed. optimum-onnx
pins transformers < 4.58, so it gets its own venv (common.VENVS/optimum_onnx).

    fp32  `optimum-cli export onnx --model HF_DIR --task text-generation-with-past OUT`
          (with accelerate present, optimum de-duplicates the tied embedding / lm_head weight)
    int8  the fp32 export, then `optimum-cli onnxruntime quantize --avx512_vnni` (or --avx2): optimum's
          dynamic int8 preset (per-tensor symmetric int8 weights on MatMul and Gather, uint8 activations
          quantized at run time)

optimum-onnx 0.1.0 has no int4 path (no MatMulNBits / weight-only option in its quantizer or CLI), so
there is no int4 variant. export_s and peak RSS cover the optimum-cli commands as a user runs them,
including the validation optimum-cli always does after exporting (it runs the torch model and the
ONNX model on dummy inputs); for int8 they are the export's plus the quantization's time and the
larger of the two peaks. The measuring happens in optimum_onnx_child.py, run by the venv's python,
one process per prompt (each row's peak RSS its own).
"""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

try:  # as `peers.optimum_onnx` (benchmarks/run.py) or as `optimum_onnx` with this folder on sys.path
    from . import common
except ImportError:
    import common
PeerError = common.PeerError

NAME = "optimum-onnx"
VARIANTS = ["fp32", "int8"]
CHILD = common.HERE / "optimum_onnx_child.py"
# torch first and pinned: the local CPU build (an unpinned torch pulls GBs of CUDA wheels).
# accelerate: without it optimum skips the tied-weight de-duplication and the export carries the
# embedding twice (653 MB instead of 539 MB for SmolLM2-135M).
INSTALLS = [["torch==2.13.0"], ["optimum-onnx[onnxruntime]==0.1.0", "accelerate", "torch==2.13.0"]]
META = "peer_export.json"  # written last into the build folder: its presence means `out` is complete
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def ensure_venv() -> Path:
    """The optimum_onnx venv's python (installed on first use, ~1-2 min from the local wheels)."""
    return common.ensure_venv("optimum_onnx", INSTALLS, check="import optimum.onnxruntime, accelerate")


def _cli(py: Path) -> Path:
    cli = Path(py).parent / "optimum-cli"
    if not cli.exists():
        raise PeerError(f"optimum-cli not found beside {py}")
    return cli


def _int8_preset() -> str:
    """optimum's dynamic int8 preset for this CPU: avx512_vnni, else avx2 (arm64 on ARM)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx2" in flags:
        return "avx2"
    raise PeerError("optimum int8: this CPU has neither AVX512-VNNI nor AVX2 (no optimum preset fits)")


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.onnx"))


def _info(out: Path, meta: dict) -> dict:
    return {"artifact": str(out), "quant": meta["quant"], "export_s": meta["export_s"],
            "export_peak_rss_mb": meta["export_peak_rss_mb"], "artifact_mb": common.dir_mb(out)}


def export(py: Path, hf_dir: Path, out: Path, variant: str) -> dict:
    """`out` = optimum-cli's export of hf_dir in `variant`, built beside it and renamed into place.

    Reuses `out` when a previous call completed it. PeerError (one line) if any step fails; no
    partial folder is left under `out`'s name.
    """
    if variant not in VARIANTS:
        raise PeerError(f"optimum-onnx has no variant {variant!r} (has {VARIANTS})")
    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    if (out / META).exists():
        return _info(out, json.loads((out / META).read_text()))
    if out.exists():
        raise PeerError(f"{out} exists but is not a complete optimum-onnx export; remove it")
    if not (hf_dir / "config.json").exists():
        raise PeerError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.parent / f".{out.name}.partial"  # same filesystem as out: the rename is atomic
    fp32 = out.parent / f".{out.name}.partial-fp32"
    cli = _cli(py)
    try:
        for d in (build, fp32):
            shutil.rmtree(d, ignore_errors=True)  # leftovers of an interrupted earlier call
        export_dir = build if variant == "fp32" else fp32
        steps = [common.run_measured([cli, "export", "onnx", "--model", hf_dir, "--task", "text-generation-with-past",
                                      export_dir], env=_OFFLINE)]
        if not _onnx_files(export_dir):
            raise PeerError(f"optimum-cli export onnx wrote no .onnx file for {hf_dir.name}")
        quant = "fp32"
        if variant == "int8":
            preset = _int8_preset()
            steps.append(common.run_measured([cli, "onnxruntime", "quantize", "--onnx_model", fp32, f"--{preset}",
                                              "-o", build], env=_OFFLINE))
            if len(_onnx_files(build)) != 1:
                raise PeerError(f"optimum-cli onnxruntime quantize wrote {len(_onnx_files(build))} .onnx files, not 1")
            # Keep the export's side files (generation_config.json ...) beside the quantized model.
            for f in fp32.iterdir():
                if f.is_file() and not f.name.startswith("model") and not (build / f.name).exists():
                    shutil.copy2(f, build / f.name)
            shutil.rmtree(fp32)
            quant = f"int8-dynamic-per-tensor ({preset})"
        meta = {"quant": quant, "export_s": round(sum(s["wall_s"] for s in steps), 2),
                "export_peak_rss_mb": round(max(s["peak_rss_mb"] for s in steps), 1), "variant": variant,
                "source": str(hf_dir), "steps": [{"wall_s": round(s["wall_s"], 2), "peak_rss_mb": round(s["peak_rss_mb"], 1)}
                                                 for s in steps]}
        (build / META).write_text(json.dumps(meta, indent=1))
        build.rename(out)
    except PeerError:
        raise
    except Exception as e:  # disk full, permissions ...: still one line for the results table
        raise PeerError(f"optimum-onnx {variant} export of {hf_dir.name} failed: {type(e).__name__}: {e}") from e
    finally:
        for d in (build, fp32):
            shutil.rmtree(d, ignore_errors=True)
    return _info(out, meta)


def bench(py: Path, artifact, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
          threads: int) -> list[dict]:
    return common.bench_per_prompt(py, CHILD, artifact, prompts, decode_tokens, warmup, repeats, threads, NAME)


def logits(py: Path, artifact, ids: list[int], out_npy: Path, threads: int) -> None:
    """Teacher-forced logits of `ids` from position 0, saved as float32 [len(ids), vocab] to out_npy."""
    out_npy = Path(out_npy).resolve()
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"artifact": str(artifact), "mode": "logits", "threads": threads, "ids": list(map(int, ids)),
           "out_npy": str(out_npy)}
    common.run_child(py, CHILD, cfg, f"optimum-onnx logits of {Path(artifact).name}")
    if not out_npy.exists():
        raise PeerError(f"optimum-onnx logits of {Path(artifact).name}: child wrote no {out_npy.name}")
