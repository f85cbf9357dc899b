"""Measure one artifact in this process: load, time to first token, prefill and decode speed, RSS.

Run as `python -m slm_export.runtimes.measure FOLDER --prompt-ids IDS.json ...`; it prints one JSON
list of BenchResult dicts. It imports the runtime only (no torch, no tokenizer), so the
peak RSS is what an app holding this model would pay. Devices run this same module remotely.
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


def measure(folder: str, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
            threads: int | None, progress: bool = False) -> list[dict]:
    from ..manifest import read
    from . import RUNTIMES, open_folder_runner

    runtime = RUNTIMES.get(read(Path(folder))["runtime"])  # the parent checked the files
    runtime.import_sdk()
    baseline = rss_mb()  # Python + the runtime's library, before the model
    t0 = time.perf_counter()
    runner = open_folder_runner(folder, threads)  # this process holds the runtime alone
    load_s = time.perf_counter() - t0
    _say(progress, f"loaded in {load_s:.2f}s ({rss_mb():.0f} MB resident)")
    rows = []
    for ids in prompts:
        p = len(ids)
        runner.check_room(p + warmup + decode_tokens)
        ttft = []
        for _ in range(repeats):
            runner.reset(p + warmup + decode_tokens + 1)
            t = time.perf_counter()
            tok = int(np.argmax(runner.forward(ids)[-1]))
            ttft.append((time.perf_counter() - t) * 1000)
        steps = []
        for i in range(warmup + decode_tokens):
            t = time.perf_counter()
            tok = int(np.argmax(runner.forward([tok])[-1]))
            if i >= warmup:
                steps.append((time.perf_counter() - t) * 1000)
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
    for heavy in ("transformers", "tokenizers") + (() if runtime.imports_torch else ("torch",)):
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
    ap.add_argument("--progress", action="store_true", help="print progress lines to stderr")
    a = ap.parse_args(argv)
    from ..errors import SlmExportError

    try:
        prompts = json.loads(open(a.prompt_ids).read())
        rows = measure(a.folder, prompts, a.decode_tokens, a.warmup, a.repeats, a.threads, a.progress)
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
