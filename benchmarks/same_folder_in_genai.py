"""One ONNX export folder, two runtimes: slm-export's runner against onnxruntime-genai, same sitting.

    python benchmarks/same_folder_in_genai.py FOLDER [--threads 2] [--prompt-tokens 32 512] [--rounds 2]

The folder's own genai_config.json opens it in onnxruntime-genai (no model builder involved: the same
model.onnx). Both sides use the one measuring protocol (greedy TTFT median of 3, then 8 warmup and 128
timed single-token decode steps, median tok/s): ours through `slm-export bench` (runtimes/measure.py),
genai's through benchmarks/peers/ortgenai_child.py, the benchmark's onnxruntime-genai child, on the
same prompt ids (the shipped passage's first N tokens). Rounds alternate ours / genai so a load change
on a shared machine hits both. Prints one JSON object: machine, rows per round, and the decode and TTFT
ratios (ours / genai) per prompt length. Needs onnxruntime-genai in this Python (the `test` extra).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def genai_rows(folder: Path, prompts: list[list[int]], threads: int) -> list[dict]:
    cfg = {"artifact": str(folder), "mode": "bench", "threads": threads, "prompts": prompts,
           "decode_tokens": 128, "warmup": 8, "repeats": 3}
    p = subprocess.run([sys.executable, str(HERE / "peers" / "ortgenai_child.py"), json.dumps(cfg)],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)["rows"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import slm_export
    from slm_export.devices.local import describe
    from slm_export.runtimes.measure import prompt_ids

    art = slm_export.open_artifact(a.folder)
    prompts = [prompt_ids(art, n) for n in a.prompt_tokens]
    rounds = []
    for _ in range(a.rounds):
        ours = [r.to_dict() for r in art.bench(prompt_tokens=tuple(a.prompt_tokens), decode_tokens=128, warmup=8,
                                               repeats=3, threads=a.threads)]
        rounds.append({"ours": ours, "genai": genai_rows(a.folder, prompts, a.threads)})
    ratios = {}
    for i, n in enumerate(a.prompt_tokens):
        ours = [r["ours"][i] for r in rounds]
        theirs = [r["genai"][i] for r in rounds]
        ratios[n] = {
            "decode_tok_s": {"ours": [r["decode_tok_s"] for r in ours], "genai": [r["decode_tok_s"] for r in theirs]},
            "ttft_ms": {"ours": [r["ttft_ms"] for r in ours], "genai": [r["ttft_ms"] for r in theirs]},
            "decode_ratio_ours_over_genai": statistics.median(o["decode_tok_s"] / t["decode_tok_s"] for o, t in zip(ours, theirs)),
            "ttft_ratio_genai_over_ours": statistics.median(t["ttft_ms"] / o["ttft_ms"] for o, t in zip(ours, theirs)),
        }
    print(json.dumps({"machine": describe(), "threads": a.threads, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
