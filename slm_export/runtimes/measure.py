"""Measure one artifact in this process: load, time to first token, prefill and decode speed, RSS.

Run as `python -m slm_export.runtimes.measure FOLDER --prompt-ids IDS.json [--runtime NAME] ...`; it
prints one JSON list of BenchResult dicts. The runtime is the artifact's own (slm-export's runner) or a
stock one (an app's own runtime with its own generation loop, `--runtime onnxruntime-genai`), measured
alike. It imports the runtime only (no torch, no tokenizer), so the peak RSS is what an app holding this
model would pay. Devices run this same module remotely.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..units import kib_to_mb


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return kib_to_mb(int(line.split()[1]))
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a big parent (one holding
    # torch and the model) would report the parent's peak.
    return _status_mb("VmHWM")


def prompt_ids(art, n: int) -> list[int]:
    """n tokens of real English (the shipped passage); random ids if there is no tokenizer.

    Called by the parent: the measuring process gets ids, so its memory is the runtime's alone
    (a tokenizer costs ~35 MB of RSS in Python, which an app pays whatever runtime it uses).
    """
    from ..errors import SlmExportError

    from ..text import passage_ids

    try:
        codec = art.codec()
    except SlmExportError:
        return np.random.default_rng(0).integers(10, art.manifest["model"]["vocab_size"], n).tolist()
    ids = passage_ids(codec)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _say(progress: bool, text: str) -> None:
    # Devices stream these lines (stderr, "progress: " first) while the run goes on.
    if progress:
        print(f"progress: {text}", file=sys.stderr, flush=True)


def open_measured(folder: str, runtime: str | None, threads: int | None):
    """(the runtime's class, a function opening its runner on `folder`): the artifact's own runtime by
    default; else the stock runtime named, or another of ours that runs the same files (executorch-pybind
    for a .pte, which benchmarks/stock_runtimes.py measures)."""
    from ..manifest import read
    from . import RUNTIMES, STOCK_RUNTIMES, open_folder_runner

    manifest = read(Path(folder))  # the parent checked the files
    if runtime is None or runtime == manifest["runtime"]:
        cls = RUNTIMES.get(manifest["runtime"])
        cls.import_sdk()
        return cls, lambda: open_folder_runner(folder, threads)  # this process holds the runtime alone
    cls = RUNTIMES.get(runtime) if runtime in RUNTIMES else STOCK_RUNTIMES.get(runtime)
    cls.import_sdk()
    return cls, lambda: cls(Path(folder), manifest, threads)


def measure(folder: str, prompts: list, decode_tokens: int, warmup: int, repeats: int,
            threads: int | None, progress: bool = False, runtime: str | None = None) -> list[dict]:
    """Each prompt (its ids, or {"ids", "text"}): `repeats` runs to the first token, then one run of
    warmup + decode_tokens more tokens, the last decode_tokens timed; the same for every runtime."""
    cls, open_runner = open_measured(folder, runtime, threads)
    baseline = rss_mb()  # Python + the runtime's library, before the model
    t0 = time.perf_counter()
    runner = open_runner()
    load_s = time.perf_counter() - t0
    _say(progress, f"loaded in {load_s:.2f}s ({rss_mb():.0f} MB resident)")
    rows = []
    for prompt in prompts:
        ids, text = (prompt["ids"], prompt.get("text")) if isinstance(prompt, dict) else (prompt, None)
        p = len(ids)
        runner.check_room(p + warmup + decode_tokens)
        ttft = [runner.timed_generate(ids, 1, text).ttft_ms for _ in range(repeats)]
        steps = runner.timed_generate(ids, 1 + warmup + decode_tokens, text).step_ms[warmup:]
        tok_s = sorted(1000.0 / s for s in steps)
        ttft_med = statistics.median(ttft)
        _say(progress, f"prompt {p}: TTFT {ttft_med:.1f} ms, decode {statistics.median(tok_s):.1f} tok/s")
        rows.append({
            "prompt_tokens": p, "ttft_ms": ttft_med, "prefill_tok_s": p / (ttft_med / 1000),
            "decode_tokens": decode_tokens, "decode_tok_s": statistics.median(tok_s),
            "decode_tok_s_min": tok_s[0], "decode_tok_s_max": tok_s[-1],
            "samples": {"ttft_ms": ttft, "decode_step_ms": steps},
        })
    for r in rows:
        r.update(load_s=load_s, threads=runner.threads, kv_capacity=runner.capacity,
                 peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline)
    # The point of this process is the runtime's memory: nothing heavy the runtime does not itself load.
    for heavy in ("transformers", "tokenizers") + (() if cls.imports_torch else ("torch",)):
        if heavy in sys.modules:
            raise RuntimeError(f"{heavy} was imported by the measuring process")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slm_export.runtimes.measure")
    ap.add_argument("folder")
    ap.add_argument("--prompt-ids", required=True, help="JSON file: a list of prompts, each a list of token ids")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runtime", default=None, help="a stock runtime's name (runtimes.STOCK_RUNTIMES) or another runtime that runs the files; default: the artifact's")
    ap.add_argument("--progress", action="store_true", help="print progress lines to stderr")
    a = ap.parse_args(argv)
    from ..errors import SlmExportError

    try:
        prompts = json.loads(open(a.prompt_ids).read())
        rows = measure(a.folder, prompts, a.decode_tokens, a.warmup, a.repeats, a.threads, a.progress, a.runtime)
    except SlmExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a heavy import: the memory figure would be wrong, so no figures
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
