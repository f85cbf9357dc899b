"""PyTorch eager fp32 with transformers' KV cache (DynamicCache): the baseline everyone starts from.

Runs in our own venv (it has torch and transformers). Its teacher-forced logits are the fp32
reference every system's quality is measured against.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import bench_per_prompt, dir_mb, run_child

NAME = "PyTorch eager"
VARIANTS = ["fp32"]
CHILD = Path(__file__).resolve().with_name("torch_eager_child.py")


def ensure_venv() -> Path:
    return Path(sys.executable)


def export(py: Path, hf_dir: Path, out: Path, variant: str) -> dict:
    """Nothing to export: the artifact is the Hugging Face folder itself."""
    return {"artifact": str(hf_dir), "quant": "fp32", "artifact_mb": dir_mb(next(Path(hf_dir).glob("*.safetensors"))),
            "export_s": None, "export_peak_rss_mb": None}


def bench(py: Path, artifact, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
          threads: int) -> list[dict]:
    return bench_per_prompt(py, CHILD, artifact, prompts, decode_tokens, warmup, repeats, threads, NAME)


def logits(py: Path, artifact, ids: list[int], out_npy: Path, threads: int) -> None:
    run_child(py, CHILD, dict(artifact=str(artifact), mode="logits", threads=threads, ids=ids, out_npy=str(out_npy)),
              "PyTorch eager logits")
