"""`slm-export bench`: measure an artifact on a device, in the one results schema."""
from __future__ import annotations

import json
import time

from . import manifest as mf
from .devices import open_device
from .pipeline import library_versions
from .results import BenchResult
from .runtimes import RUNTIMES
from .runtimes.measure import prompt_ids


def weight_bytes_per_token(artifact) -> int:
    """Bytes of weights a decode step reads: every matrix, but only one row of the embedding."""
    report = json.loads((artifact.path / artifact.manifest["quant"]["report"]).read_text())["weights"]
    total = 0
    for e in report:
        if e["name"] == "embed_tokens" and not ("lm_head.weight" in e["sources"]):
            total += e["stored_bytes"] // max(e["shape"][0], 1)
        else:
            total += e["stored_bytes"]
    return total


def predicted_tok_s(artifact, profile, context: int) -> float | None:
    """`fit`'s decode estimate for this artifact on `profile` at `context` tokens, from its real weights."""
    if profile is None:
        return None
    from .fit import STEP_CYCLES_PER_LAYER, decode_roofline

    m = artifact.manifest
    layout = m["model"]
    kv_bytes = {"float16": 2, "float32": 4}.get(m["target_extra"].get("kv_layout", {}).get("dtype", "float32"), 4)
    kv = layout["layers"] * 2 * layout["kv_heads"] * layout["head_dim"] * kv_bytes * context
    spec = m["quant"]["spec"]
    int8 = spec["bits"] != 16 and spec["activations"] == "int8" and not m["quant"]["label"].endswith("-wo")
    ceiling, _ = decode_roofline(profile, weight_bytes_per_token(artifact), kv, 2 * layout["parameters"], int8)
    return 1 / (1 / ceiling + layout["layers"] * STEP_CYCLES_PER_LAYER / (profile.big_core_ghz * 1e9))


def bench(artifact, *, device: str = "local", prompt_tokens=(32,), decode_tokens: int = 128, warmup: int = 8,
          repeats: int = 3, threads: int | None = None, device_options: dict | None = None) -> list[BenchResult]:
    m = artifact.manifest
    RUNTIMES.get(m["runtime"]).check_available()  # e.g. Core ML off macOS: one sentence, no empty rows
    dev = open_device(device, **(device_options or {}))
    profile = dev.profile
    base = dict(system=f"slm-export {m['target']} {m['quant']['label']}",
                model=mf.source_label(m["source"]),
                target=m["target"], runtime=m["runtime"], device=dev.name, simulated=dev.simulated,
                quant=m["quant"]["label"], artifact_mb=round(artifact.size_mb, 2),
                device_peak_gb_s=profile.peak_bandwidth_gb_s if profile else None,
                versions=library_versions(*RUNTIMES.get(m["runtime"]).packages),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    per_token = weight_bytes_per_token(artifact)
    results = []
    for p in prompt_tokens:
        # One process per prompt length, so each row's peak RSS is its own.
        predicted = predicted_tok_s(artifact, profile, p + warmup + decode_tokens // 2)
        row = dict(base, prompt_tokens=p, predicted_decode_tok_s=round(predicted, 1) if predicted else None)
        try:
            (r,) = dev.measure(artifact.path, prompts=[prompt_ids(artifact, p)], decode_tokens=decode_tokens,
                               warmup=warmup, repeats=repeats, threads=threads)
        except RuntimeError as e:  # a failed run is a row with its error, not a missing row
            results.append(BenchResult(**row, machine=dev.describe(), error=str(e)))
            continue
        r["decode_gb_s"] = per_token * r["decode_tok_s"] / 1e9
        row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
        machine = dev.describe()  # after the run: a board's temperature and throttling after it, too
        if machine.get("runtimes"):  # a remote device: the versions that ran are the board's
            row["versions"] = {k: v for k, v in machine["runtimes"].items() if k in base["versions"]}
        results.append(BenchResult(**row, machine=machine))
    return results
