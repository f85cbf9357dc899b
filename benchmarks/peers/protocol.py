"""The measuring protocol every peer's child process runs: the same as slm_export.runtimes.measure.

Standard library + numpy only: it is imported inside each peer's own virtual environment
(`sys.path` gets this folder), where slm_export is not installed. A peer's child wraps its runtime
in a `Session` (three methods) and calls `measure` for speed or `teacher_forced` for quality.

    TTFT    = prompt ids in -> first greedy id out, median of `repeats`, cache emptied each time
    decode  = `warmup` + `decode_tokens` single-token greedy steps, each timed alone
    peak RSS = this process's VmHWM (ru_maxrss would report a big parent's peak: it survives exec)
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # KiB -> MB (10^6 bytes), as slm-export prints
    return float("nan")


class Session:
    """What a peer's child implements around its runtime."""

    def reset(self) -> None:  # empty the KV cache: the next call starts at position 0
        raise NotImplementedError

    def feed(self, ids: list[int]) -> np.ndarray:  # append ids to the cache; logits of the last one, [vocab]
        raise NotImplementedError

    def feed_all(self, ids: list[int]) -> np.ndarray:  # append ids; logits of every one, [len(ids), vocab]
        return np.stack([self.feed([i]) for i in ids])


def measure(session: Session, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for ids in prompts:
        ttft = []
        for _ in range(repeats):
            session.reset()
            t = time.perf_counter()
            tok = int(np.argmax(session.feed(list(ids))))
            ttft.append((time.perf_counter() - t) * 1000)
        steps = []
        for i in range(warmup + decode_tokens):
            t = time.perf_counter()
            tok = int(np.argmax(session.feed([tok])))
            if i >= warmup:
                steps.append((time.perf_counter() - t) * 1000)
        tok_s = sorted(1000.0 / s for s in steps)
        med = statistics.median(ttft)
        rows.append({"prompt_tokens": len(ids), "ttft_ms": med, "prefill_tok_s": len(ids) / (med / 1000),
                     "decode_tokens": decode_tokens, "decode_tok_s": statistics.median(tok_s),
                     "decode_tok_s_min": tok_s[0], "decode_tok_s_max": tok_s[-1],
                     "samples": {"ttft_ms": ttft, "decode_step_ms": steps}})
    return rows


def teacher_forced(session: Session, ids: list[int], out_npy: str) -> None:
    """Logits of every position of `ids` (fed from position 0), saved as float32 [len(ids), vocab]."""
    session.reset()
    np.save(out_npy, np.asarray(session.feed_all(list(ids)), dtype=np.float32))


def child_main(open_session) -> int:
    """The whole child: `python X_child.py CONFIG_JSON`; prints one JSON object on stdout.

    CONFIG: {"artifact", "mode": "bench" | "logits", "threads", and for bench "prompts",
    "decode_tokens", "warmup", "repeats"; for logits "ids", "out_npy"}.
    open_session(artifact, threads) -> (session, versions dict). Errors go to stderr, exit 1.
    """
    cfg = json.loads(sys.argv[1])
    baseline = status_mb("VmRSS")  # Python + the runtime's library, before the model
    t0 = time.perf_counter()
    session, versions = open_session(cfg["artifact"], cfg["threads"])
    load_s = time.perf_counter() - t0
    if cfg["mode"] == "logits":
        teacher_forced(session, cfg["ids"], cfg["out_npy"])
        print(json.dumps({"versions": versions}))
        return 0
    rows = measure(session, cfg["prompts"], cfg["decode_tokens"], cfg["warmup"], cfg["repeats"])
    peak = status_mb("VmHWM")
    for r in rows:
        r.update(load_s=load_s, threads=cfg["threads"], peak_rss_mb=peak, baseline_rss_mb=baseline)
    print(json.dumps({"rows": rows, "versions": versions}))
    return 0
