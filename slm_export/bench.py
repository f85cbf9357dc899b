"""`slm-export bench`: measure an artifact on a device, in the one results schema."""
from __future__ import annotations

import time

from . import manifest as mf
from .devices import DEVICES
from .pipeline import library_versions
from .results import BenchResult
from .runtimes import RUNTIMES
from .runtimes.measure import prompt_ids


def weight_bytes_per_token(artifact) -> int:
    """Bytes of weights a decode step reads: every matrix, but only one row of the embedding."""
    import json

    report = json.loads((artifact.path / artifact.manifest["quant"]["report"]).read_text())["weights"]
    total = 0
    for e in report:
        if e["name"] == "embed_tokens":
            total += e["stored_bytes"] // max(e["shape"][0], 1)
        else:
            total += e["stored_bytes"]
    return total


def bench(artifact, *, device: str = "local", prompt_tokens=(32,), decode_tokens: int = 128, warmup: int = 8,
          repeats: int = 3, threads: int | None = None) -> list[BenchResult]:
    dev = DEVICES.get(device)()
    m = artifact.manifest
    RUNTIMES.get(m["runtime"]).check_available()  # e.g. Core ML off macOS: one sentence, no empty rows
    base = dict(system=f"slm-export {m['target']} {m['quant']['label']}",
                model=mf.source_label(m["source"]),
                target=m["target"], runtime=m["runtime"], device=dev.name, quant=m["quant"]["label"],
                artifact_mb=round(artifact.size_mb, 2), machine=dev.describe(),
                versions=library_versions(*RUNTIMES.get(m["runtime"]).packages), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    per_token = weight_bytes_per_token(artifact)
    results = []
    for p in prompt_tokens:
        # One process per prompt length, so each row's peak RSS is its own.
        try:
            (r,) = dev.measure(artifact.path, prompts=[prompt_ids(artifact, p)], decode_tokens=decode_tokens,
                               warmup=warmup, repeats=repeats, threads=threads)
        except RuntimeError as e:  # a failed run is a row with its error, not a missing row
            results.append(BenchResult(**base, prompt_tokens=p, error=str(e)))
            continue
        r["decode_gb_s"] = per_token * r["decode_tok_s"] / 1e9
        results.append(BenchResult(**base, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    return results
