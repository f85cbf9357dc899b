"""`slm-export bench`: measure an artifact on a device, in the one results schema."""
from __future__ import annotations

import time

from . import manifest as mf
from . import progress
from .devices import open_device
from .fit import fit
from .results import BenchResult
from .runtimes import RUNTIMES
from .runtimes.measure import prompt_ids


def weight_bytes_per_token(artifact) -> int:
    """Bytes of weights a decode step reads (see fit.bytes_read_per_token), from the artifact's report."""
    from .fit import bytes_read_per_token, report_weight_bytes

    return bytes_read_per_token(report_weight_bytes(artifact.path))


def check_lengths(manifest: dict, prompt_tokens, decode_tokens: int, warmup: int, repeats: int) -> None:
    """Refuse, before anything runs, counts out of range or runs the artifact's KV cache cannot hold."""
    from .errors import SlmExportError

    for flag, value, low in (("--decode-tokens", decode_tokens, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1),
                             *(("--prompt-tokens", p, 1) for p in prompt_tokens)):
        if value < low:
            raise SlmExportError(f"{flag} {value} is out of range; use an integer >= {low}")
    room, longest = manifest["max_context"], max(prompt_tokens)
    if longest + warmup + decode_tokens > room:
        raise SlmExportError(f"--prompt-tokens {longest} + --warmup {warmup} + --decode-tokens {decode_tokens} exceed the "
                             f"artifact's max context of {room} tokens; use at most {room} in all")


def bench(artifact, *, device: str = "local", prompt_tokens=(32,), decode_tokens: int = 128, warmup: int = 8,
          repeats: int = 3, threads: int | None = None, device_options: dict | None = None) -> list[BenchResult]:
    m = artifact.manifest
    check_lengths(m, prompt_tokens, decode_tokens, warmup, repeats)
    RUNTIMES.get(m["runtime"]).check_available()  # e.g. Core ML off macOS: one sentence, no empty rows
    dev = open_device(device, **(device_options or {}))
    profile = dev.profile
    extra = m.get("target_extra", {})
    kv_bits = extra.get("kv_bits", 32)
    fp16 = extra.get("compute_precision") == "float16"  # its KV cache is fp16 too: no kv suffix
    base = dict(system=f"slm-export {m['target']} {m['quant']['label']}" + (f" kv{kv_bits}" if kv_bits != 32 and not fp16 else ""),
                model=mf.source_label(m["source"]),
                target=m["target"], runtime=m["runtime"], device=dev.name, simulated=dev.simulated,
                quant=m["quant"]["label"], artifact_mb=round(artifact.size_mb, 2),
                device_peak_gb_s=profile.peak_bandwidth_gb_s if profile else None,
                versions=mf.library_versions(*RUNTIMES.get(m["runtime"]).packages),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    per_token = weight_bytes_per_token(artifact)
    results = []
    for p in prompt_tokens:
        # One process per prompt length, so each row's peak RSS is its own.
        # fit's estimate for this device at the middle of the timed decode, from the artifact's real weights
        predicted = profile and fit(profile, artifact=artifact.path, context=p + warmup + decode_tokens // 2)
        row = dict(base, prompt_tokens=p,
                   predicted_decode_tok_s=predicted.expected_decode_tok_s_full_context if predicted else None)
        try:
            with progress.stage(f"{dev.name}: prompt {p} + {decode_tokens} decoded tokens, {repeats} timed run"
                                + ("s" if repeats != 1 else "")):
                (r,) = dev.measure(artifact.path, prompts=[prompt_ids(artifact, p)], decode_tokens=decode_tokens,
                                   warmup=warmup, repeats=repeats, threads=threads)
        except RuntimeError as e:  # a failed run is a row with its error, not a missing row
            results.append(BenchResult(**row, machine=dev.describe(), error=str(e)))
            continue
        if r.get("decode_tok_s") is not None:  # an emulated run reports no timings
            r["decode_gb_s"] = per_token * r["decode_tok_s"] / 1e9
        row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
        machine = dict(dev.describe())  # after the run (a board's temperature after it); a copy per row
        if machine.get("runtimes"):  # a remote device: the versions that ran are the board's
            row["versions"] = {k: v for k, v in machine["runtimes"].items() if k in base["versions"]}
        results.append(BenchResult(**row, machine=machine))
    return results
