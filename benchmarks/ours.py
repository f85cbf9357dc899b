"""slm-export's own targets, driven the way a user drives them, in the peers' shape.

Each export is the CLI command a user types (`slm-export --model DIR --target T --bits B`), timed
with its peak RSS like every peer's export; speed is `Artifact.bench` (the measuring process of
`slm-export bench`, one per prompt); quality is the artifact's runtime fed the same token ids.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "peers"), str(HERE.parent)]

from common import run_child, run_measured  # noqa: E402

NAME = "slm-export"
SLM_EXPORT = Path(sys.executable).with_name("slm-export")
# Teacher-forced logits of an artifact, in our venv, through the same runner `generate` uses.
_LOGITS = """
import json, sys
import numpy as np
from slm_export.artifact import Artifact
cfg = json.loads(sys.argv[1])
runner = Artifact.open(cfg["artifact"]).runner(cfg["threads"])
runner.reset(len(cfg["ids"]) + 1)
np.save(cfg["out_npy"], np.asarray(runner.forward(cfg["ids"], all_logits=True), dtype=np.float32))
print(json.dumps({}))
"""


def export(hf_dir: Path, out: Path, target: str, bits: int | None, kv_bits: int | None = None,
           compute_precision: str | None = None, lm_head_bits: int | None = None, extra: list | None = None) -> dict:
    """`extra`: more CLI arguments (e.g. ["--quant-method", "gptq"]); bits None: the CLI's default or extra's."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    kv = ["--kv-bits", kv_bits] if kv_bits else []
    head = ["--lm-head-bits", lm_head_bits] if lm_head_bits else []
    precision = ["--compute-precision", compute_precision] if compute_precision else []
    bits_arg = ["--bits", bits] if bits is not None else []
    got = run_measured([SLM_EXPORT, "--model", hf_dir, "--target", target, *bits_arg, *kv, *head, *precision,
                        *(extra or []), "--out", out, "--force"])
    from slm_export.artifact import Artifact

    art = Artifact.open(out)
    return {"artifact": str(out), "quant": art.manifest["quant"]["label"], "artifact_mb": round(art.size_mb, 2),
            "export_s": got["wall_s"], "export_peak_rss_mb": got["peak_rss_mb"]}


def bench(artifact, prompt_tokens: list[int], decode_tokens: int, warmup: int, repeats: int, threads: int) -> list:
    from slm_export.artifact import Artifact

    return Artifact.open(artifact).bench(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, warmup=warmup,
                                         repeats=repeats, threads=threads)


def logits(artifact, ids: list[int], out_npy: Path, threads: int) -> None:
    script = Path(out_npy).with_suffix(".py")
    script.write_text(_LOGITS)
    run_child(Path(sys.executable), script,
              dict(artifact=str(artifact), ids=ids, out_npy=str(out_npy), threads=threads), f"logits of {artifact}")
