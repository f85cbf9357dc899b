"""The onnxruntime-genai peer: its model builder's int4 CPU export, run by onnxruntime-genai.

Standard library only, so the benchmark runner can import it without the peer installed. The
builder and the runtime live in their own venv (common.VENVS/ortgenai); the measuring happens in
`ortgenai_child.py` (protocol.child_main), one process per prompt so each row's peak RSS is its own.

Export: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` = round-to-nearest symmetric int4,
block 32, on every MatMul (MatMulNBits) and, for models with tied embeddings, one int4 matrix shared
by the embedding (GatherBlockQuantized) and the LM head. accuracy_level 4 (the builder's CPU default
in 0.18, passed explicitly) makes MatMulNBits quantize activations to int8: on this 2-core x86 machine
it decoded SmolLM2-135M ~1.4x faster than accuracy_level 1 (fp32 activations).
prune_lm_head=true (a builder option): a prompt's forward computes the LM head for its last position
only, as our own ONNX export does when generating (logits_to_keep=1); without it a 512-token prompt
also materialises 512 x vocab logits (~100 MB for SmolLM2) and its TTFT is ~17% longer. The last
position's logits are bit-identical either way; teacher-forced logits then come one token at a time.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

try:  # as `peers.ortgenai` (benchmarks/run.py) or as `ortgenai` with this folder on sys.path
    from . import common
except ImportError:
    import common
PeerError = common.PeerError

NAME = "onnxruntime-genai"
VARIANTS = ["int4", "int4-kv8"]  # kv8: the builder's int8 KV cache, scales calibrated as slm-export's --kv-bits 8
CHILD = common.HERE / "ortgenai_child.py"
CALIBRATE = common.HERE / "ortgenai_calibrate.py"
ACCURACY_LEVEL = 4  # int8 activations: the faster of the levels measured here (4 vs 1)
BLOCK_SIZE = 32  # the builder's default
PRUNE_LM_HEAD = True  # LM head on the last position only (see above)
MARKER = "ortgenai_export.json"  # written last into a finished export: its figures, for reuse (the child reads it)

# torch first and pinned: the builder needs torch, and an unpinned one would pull CUDA wheels.
# builder 0.18 imports transformers' Qwen3.5 classes at module level, so transformers 4.x cannot
# load it; 5.x reads the input configs (rope_parameters/dtype) natively.
INSTALLS = [
    ["torch==2.13.0"],
    ["onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "onnx==1.23.2", "onnx-ir==1.1.0", "transformers==5.24.0",
     "safetensors", "tqdm", "torch==2.13.0"],
]


def ensure_venv() -> Path:
    return common.ensure_venv("ortgenai", INSTALLS, check="import onnxruntime_genai, onnxruntime_genai.models.builder")


def _quant_label(accuracy_level: int, variant: str = "int4") -> str:
    label = f"int4 (RTN block {BLOCK_SIZE}, accuracy_level {accuracy_level})"
    return label + (" + int8 KV cache (per channel, calibrated)" if variant.endswith("-kv8") else "")


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("genai_config.json", "model.onnx", MARKER))


def export(py: Path, hf_dir: Path, out: Path, variant: str, accuracy_level: int = ACCURACY_LEVEL,
           prune_lm_head: bool = PRUNE_LM_HEAD) -> dict:
    """out = the builder's int4 CPU model of hf_dir (variant int4-kv8: with its int8 KV cache); reused when a
    finished export is already there."""
    if variant not in VARIANTS:
        raise PeerError(f"{NAME}: unknown variant {variant!r} (have {', '.join(VARIANTS)})")
    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    quant = _quant_label(accuracy_level, variant)
    if out.exists():
        if not _complete(out):
            raise PeerError(f"{NAME}: {out} exists but is not a finished export (no {MARKER}); remove it")
        info = json.loads((out / MARKER).read_text())
        if info["quant"] != quant or info.get("prune_lm_head") != prune_lm_head:
            raise PeerError(f"{NAME}: {out} holds {info['quant']} (prune_lm_head {info.get('prune_lm_head')}), "
                            f"not {quant} (prune_lm_head {prune_lm_head})")
        return _result(out, info)
    if not (hf_dir / "config.json").is_file():
        raise PeerError(f"{NAME}: {hf_dir} is not a Hugging Face model folder (no config.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        built = tmp / "model"
        options = [f"accuracy_level={accuracy_level}", f"block_size={BLOCK_SIZE}", f"prune_lm_head={str(prune_lm_head).lower()}"]
        before_s = 0.0  # the fp32-cache export and calibration a kv8 build needs first
        if variant.endswith("-kv8"):
            kv8, before_s = _kv8_options(py, hf_dir, out, tmp, accuracy_level, prune_lm_head)
            options += kv8
        cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(built),
               "-p", "int4", "-e", "cpu", "-c", str(tmp / "cache"), "--extra_options", *options]
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        try:
            m = common.run_measured(cmd, env=env, cwd=tmp)
        except PeerError as e:
            raise PeerError(f"{NAME} model builder on {hf_dir.name}: {e}") from None
        missing = [f for f in ("genai_config.json", "model.onnx") if not (built / f).is_file()]
        if missing:
            raise PeerError(f"{NAME} model builder on {hf_dir.name} exited 0 but wrote no {', '.join(missing)}")
        info = {"artifact": str(out), "quant": quant, "export_s": round(before_s + m["wall_s"], 2),
                "export_peak_rss_mb": round(m["peak_rss_mb"], 1), "artifact_mb": common.dir_mb(built),
                "source": str(hf_dir), "accuracy_level": accuracy_level, "block_size": BLOCK_SIZE,
                "prune_lm_head": prune_lm_head, "made": common.now()}
        (built / MARKER).write_text(json.dumps(info, indent=1))
        try:
            os.rename(built, out)  # same filesystem (tmp is out's sibling): atomic, never half-written
        except OSError as e:  # `out` appeared meanwhile (another export of it)
            raise PeerError(f"{NAME}: could not move the export into {out}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _result(out, info)


def _kv8_options(py: Path, hf_dir: Path, out: Path, tmp: Path, accuracy_level: int,
                 prune_lm_head: bool) -> tuple[list[str], float]:
    """The builder options for its int8 KV cache, and the seconds spent making its scale file.

    The builder needs calibrated scales and does not make them: ortgenai_calibrate.py runs the
    fp32-cache int4 export (the sibling `int4` folder, made here if missing) on the same text with
    the same margin as slm-export's --kv-bits 8.
    """
    import time
    from importlib import resources

    from slm_export.exporters.onnx.kv_cache import CALIBRATION_TOKENS, MARGIN

    base = export(py, hf_dir, out.with_name(out.name.removesuffix("-kv8")), "int4", accuracy_level, prune_lm_head)
    scales = tmp / "kv_scales.json"
    cfg = {"artifact": base["artifact"], "passage": str(resources.files("slm_export").joinpath("data/passage.txt")),
           "tokens": CALIBRATION_TOKENS, "margin": MARGIN, "out_json": str(scales)}
    t0 = time.perf_counter()
    common.run_child(py, CALIBRATE, cfg, f"{NAME} KV-cache calibration of {hf_dir.name}")
    spent = base["export_s"] + time.perf_counter() - t0
    return ["kv_cache_quant_scheme=int8_per_channel", f"kv_cache_scale_file={scales}"], spent


def _result(out: Path, info: dict) -> dict:
    return {"artifact": str(out), **{k: info[k] for k in ("quant", "export_s", "export_peak_rss_mb", "artifact_mb")}}


def bench(py: Path, artifact, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
          threads: int) -> list[dict]:
    return common.bench_per_prompt(py, CHILD, artifact, prompts, decode_tokens, warmup, repeats, threads, NAME)


def _npy_shape(path: Path) -> tuple[str, tuple]:
    """(dtype descr, shape) from a .npy header, without numpy."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise PeerError(f"{NAME}: {path} is not a .npy file")
        major = f.read(2)[0]
        n = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
        header = ast.literal_eval(f.read(n).decode("latin1"))
    return header["descr"], tuple(header["shape"])


def logits(py: Path, artifact, ids: list[int], out_npy: Path, threads: int) -> None:
    """Teacher-forced logits of ids from position 0, float32 [len(ids), vocab] (one token at a time
    through the KV cache for a pruned-LM-head export, else one prefill pass)."""
    out_npy = Path(out_npy)
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_npy.with_name(f".{out_npy.stem}.tmp.npy")
    cfg = {"artifact": str(artifact), "mode": "logits", "threads": threads, "ids": list(ids), "out_npy": str(tmp)}
    try:
        common.run_child(py, CHILD, cfg, f"{NAME} logits of {Path(artifact).name}")
        descr, shape = _npy_shape(tmp)
        if descr != "<f4" or len(shape) != 2 or shape[0] != len(ids):
            raise PeerError(f"{NAME} logits: got {descr} {shape}, expected float32 [{len(ids)}, vocab]")
        os.replace(tmp, out_npy)
    finally:
        tmp.unlink(missing_ok=True)
