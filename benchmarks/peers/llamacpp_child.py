"""Measure a GGUF with llama-cpp-python; runs inside the llama.cpp venv, started by llamacpp.py.

    python llamacpp_child.py '{"model": ..., "passage": ..., "prompt_tokens": [32], "decode_tokens": 128,
                               "warmup": 8, "repeats": 3, "threads": 2}'

Same protocol as slm_export.runtimes.measure: TTFT = prompt ids in -> first greedy id out (median of
`repeats`, cache cleared each time), then `warmup` + `decode_tokens` single-token greedy steps, each
timed alone; peak RSS = this process's VmHWM. Prints one JSON list, one dict per prompt length.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import llama_cpp
import numpy as np  # a dependency of llama-cpp-python (Llama.scores is an ndarray), so always here
from llama_cpp import Llama


def status_mb(field: str) -> float:
    # VmHWM/VmRSS of this process only; ru_maxrss would include the parent's peak (it survives exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def clear_cache(llm: Llama) -> None:
    """Empty the KV cache: llm.reset() alone only rewinds llama-cpp-python's token count."""
    llm.reset()
    llm._ctx.kv_cache_clear()  # 0.3.x: llama_memory_clear(llama_get_memory(ctx), True)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == -1, "KV cache not empty after clearing"


def greedy(llm: Llama) -> int:
    # The logits of the batch's last token, read from the context: with logits_all=False,
    # llama-cpp-python >= 0.3 no longer copies them into llm.scores (it stays zeros).
    row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))))


def main() -> int:
    cfg = json.loads(sys.argv[1])
    warmup, decode, repeats = cfg["warmup"], cfg["decode_tokens"], cfg["repeats"]
    baseline = status_mb("VmRSS")
    t0 = time.perf_counter()
    llm = Llama(model_path=cfg["model"], n_ctx=max(cfg["prompt_tokens"]) + warmup + decode + 8,
                n_threads=cfg["threads"], n_threads_batch=cfg["threads"], n_batch=512, verbose=False,
                logits_all=False)
    load_s = time.perf_counter() - t0

    # The model's own tokenizer on the shipped passage; the same ids our runner gets (same vocab).
    ids_all = llm.tokenize(open(cfg["passage"]).read().encode(), add_bos=True)
    rows = []
    for p in cfg["prompt_tokens"]:
        ids = (ids_all * (p // len(ids_all) + 1))[:p]
        ttft = []
        for _ in range(repeats):
            clear_cache(llm)
            t = time.perf_counter()
            llm.eval(ids)
            tok = greedy(llm)
            ttft.append((time.perf_counter() - t) * 1000)
        steps = []
        for i in range(warmup + decode):
            t = time.perf_counter()
            llm.eval([tok])
            tok = greedy(llm)
            if i >= warmup:
                steps.append((time.perf_counter() - t) * 1000)
        tok_s = sorted(1000.0 / s for s in steps)
        med = statistics.median(ttft)
        rows.append({"prompt_tokens": p, "ttft_ms": med, "prefill_tok_s": p / (med / 1000), "decode_tokens": decode,
                     "decode_tok_s": statistics.median(tok_s), "decode_tok_s_min": tok_s[0],
                     "decode_tok_s_max": tok_s[-1], "samples": {"ttft_ms": ttft, "decode_step_ms": steps}})

    peak = status_mb("VmHWM")  # before the sanity check, so the peak is the measurement's own
    # Sanity check, after timing: the GGUF's own chat template, greedy.
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     max_tokens=12, temperature=0)
    text = out["choices"][0]["message"]["content"]
    for r in rows:
        r.update(load_s=load_s, threads=cfg["threads"], kv_capacity=llm.n_ctx(), peak_rss_mb=peak,
                 baseline_rss_mb=baseline, sample_text=text, versions={"llama_cpp_python": llama_cpp.__version__})
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
