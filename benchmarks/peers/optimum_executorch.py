"""The optimum-executorch peer: Hugging Face's `optimum-cli export executorch`, run by the ExecuTorch runtime.

Standard library only, so the benchmark runner imports it whatever is installed. optimum-executorch
1.1.0 pins transformers==5.0.0rc1 (ours is newer), hence its own venv. The export is the one its
README recommends for CPU: XNNPACK recipe, custom SDPA + custom KV cache (ExecuTorch's llama ops),
dynamic sequence length (prefill in one call), KV cache sized like ours: min(2048, the model's
max_position_embeddings). Measuring happens in `optimum_executorch_child.py`, run by the venv's
python, one process per prompt so each row's peak RSS is that process's own.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

try:  # `from peers import optimum_executorch` (benchmarks/run.py) or with benchmarks/peers on sys.path
    from . import common
except ImportError:
    import common
PeerError = common.PeerError

NAME = "optimum-executorch"
VARIANTS = ["8da4w"]  # the fastest; "fp32" also works (export() accepts it), left out to keep the sitting short
CHILD = Path(__file__).resolve().with_name("optimum_executorch_child.py")

# torch first, alone: the local CPU build; naming torch==2.13.0 again in every later step keeps pip
# from "upgrading" it to a CUDA build to satisfy someone's requirement. executorch 1.5.1 + torchao
# 0.18 are the pair known to work with torch 2.13.0; optimum-executorch 1.1.0 asks only
# executorch>=1.0.0, so nothing needs --no-deps.
_PINS = ["torch==2.13.0", "executorch==1.5.1", "torchao==0.18.0"]
INSTALLS = [["torch==2.13.0"], _PINS, ["optimum-executorch==1.1.0", *_PINS]]

# optimum-cli flags per variant, and the label for the results table.
_FLAGS = {"8da4w": ["--qlinear", "8da4w", "--qembedding", "8w"], "fp32": []}
_QUANT = {"8da4w": "8da4w linear (int4 weights, group 32; int8 dynamic activations) + int8 embedding",
          "fp32": "fp32"}
_RECORD = "export.json"  # written last into the temp dir: its presence marks a complete export
_QUIET = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_venv() -> Path:
    """VENVS/optimum_executorch (~2 min, ~1.5 GB); its python."""
    return common.ensure_venv("optimum_executorch", INSTALLS, check="import optimum.executorch, executorch.runtime")


def _max_seq_len(hf_dir: Path) -> int:
    """min(2048, max_position_embeddings): the KV cache length our own exporter uses by default."""
    try:
        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PeerError(f"{NAME}: cannot read {hf_dir}/config.json: {e}") from None
    return min(2048, int(cfg.get("max_position_embeddings") or 2048))


def export(py: Path, hf_dir: Path, out: Path, variant: str) -> dict:
    """out/model.pte exported from the HF folder; reuses a complete `out`. Returns the export's figures."""
    if variant not in _FLAGS:
        raise PeerError(f"{NAME}: unknown variant {variant!r} (known: {', '.join(_FLAGS)})")
    out, hf_dir = Path(out).resolve(), Path(hf_dir).resolve()
    record = out / _RECORD
    if record.exists():
        info = json.loads(record.read_text())
        if Path(info["artifact"]).exists():
            return info
    cli = Path(py).parent / "optimum-cli"
    max_seq_len = _max_seq_len(hf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cmd = [cli, "export", "executorch", "--model", hf_dir, "--task", "text-generation", "--recipe", "xnnpack",
               "--use_custom_sdpa", "--use_custom_kv_cache", *_FLAGS[variant], "--max_seq_len", str(max_seq_len),
               "--output_dir", tmp]
        measured = common.run_measured(cmd, env=_QUIET, cwd=tmp)
        ptes = sorted(tmp.glob("*.pte"))
        if len(ptes) != 1:
            raise PeerError(f"{NAME} export wrote {len(ptes)} .pte files into its output folder, expected one: "
                            f"{common.last_line(measured['output'])}")
        info = {"artifact": str(out / ptes[0].name), "quant": _QUANT[variant], "export_s": round(measured["wall_s"], 1),
                "export_peak_rss_mb": round(measured["peak_rss_mb"], 1), "artifact_mb": common.dir_mb(ptes[0]),
                "max_seq_len": max_seq_len, "command": " ".join(map(str, cmd[1:])).replace(str(tmp), str(out))}
        (tmp / _RECORD).write_text(json.dumps(info, indent=1))
        if out.exists():  # an incomplete leftover (no record): replace it
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def bench(py: Path, artifact, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
          threads: int) -> list[dict]:
    return common.bench_per_prompt(py, CHILD, artifact, prompts, decode_tokens, warmup, repeats, threads, NAME)


def logits(py: Path, artifact, ids: list[int], out_npy: Path, threads: int) -> None:
    """Teacher-forced logits of `ids` fed from position 0, saved as float32 [len(ids), vocab] in out_npy."""
    out_npy = Path(out_npy).resolve()
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    cfg = dict(artifact=str(artifact), mode="logits", threads=threads, ids=list(map(int, ids)), out_npy=str(out_npy))
    common.run_child(py, CHILD, cfg, f"{NAME} logits of {Path(artifact).name}")
    if not out_npy.exists():
        raise PeerError(f"{NAME} logits child exited 0 but wrote no {out_npy.name}")
