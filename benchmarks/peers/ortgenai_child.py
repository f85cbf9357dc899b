"""Measure a model-builder ONNX folder with onnxruntime-genai; runs inside the ortgenai venv.

    python ortgenai_child.py CONFIG_JSON      (see protocol.child_main; started by ortgenai.py)

Imports onnxruntime_genai and numpy only (no torch/transformers: this process's memory is measured).
Threads: the decoder's ONNX Runtime session gets intra_op_num_threads=threads (inter_op 1) through
an og.Config overlay of genai_config.json (checked with per-thread CPU time: threads=1 decodes on one
busy thread, threads=2 on two; ORT's default here would be one per core).
KV cache: the builder's genai_config uses past_present_share_buffer, i.e. one buffer of max_length
positions allocated per generator; max_length is sized to this run (like llama.cpp's n_ctx), not
the model's 8192-position default, which would add hundreds of MB of cache nobody uses.
Teacher-forced logits: one prefill pass when the graph outputs every position's logits; an export
with prune_lm_head (recorded in ortgenai.py's marker file) outputs the last only, so one token at a time.
"""
from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from protocol import Session, child_main

MARGIN = 8  # positions beyond what the run feeds
MARKER = "ortgenai_export.json"  # ortgenai.MARKER (that module is the parent's; not imported here)


def _capacity() -> int:
    """Positions this run feeds: the longest prompt + warmup + decode steps, or the logits ids."""
    cfg = json.loads(sys.argv[1])
    if cfg["mode"] == "logits":
        return len(cfg["ids"]) + MARGIN
    return max(len(p) for p in cfg["prompts"]) + cfg["warmup"] + cfg["decode_tokens"] + MARGIN


class OgaSession(Session):
    def __init__(self, model: og.Model, max_length: int, all_logits: bool):
        self.model = model
        self.all_logits = all_logits  # the graph outputs logits for every input position
        self.params = og.GeneratorParams(model)
        self.params.set_search_options(max_length=max_length)  # greedy is the builder's default search
        self.gen = None
        self.reset()

    def reset(self) -> None:
        # A fresh generator is an empty KV cache at position 0. Drop the old one first, so two
        # caches never coexist (that would inflate the measured peak).
        self.gen = None
        self.gen = og.Generator(self.model, self.params)

    def feed(self, ids: list[int]) -> np.ndarray:
        self.gen.append_tokens(list(ids))  # runs the model on ids now
        return np.array(self.gen.get_logits(), dtype=np.float32).reshape(-1)  # copy: og reuses its buffer

    def feed_all(self, ids: list[int]) -> np.ndarray:
        if not self.all_logits:
            return super().feed_all(ids)  # one token at a time
        self.gen.append_tokens(list(ids))  # one prefill call
        out = np.array(self.gen.get_output("logits"), dtype=np.float32)
        if out.ndim != 3 or out.shape[1] != len(ids):
            raise RuntimeError(f"logits output has shape {out.shape}, expected [1, {len(ids)}, vocab]")
        return out[0]


def open_session(artifact: str, threads: int):
    config = og.Config(artifact)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    versions = {"onnxruntime_genai": og.__version__, "onnxruntime": metadata.version("onnxruntime")}
    marker = Path(artifact) / MARKER
    pruned = json.loads(marker.read_text()).get("prune_lm_head", False) if marker.exists() else False
    return OgaSession(model, _capacity(), all_logits=not pruned), versions


if __name__ == "__main__":
    sys.exit(child_main(open_session))
