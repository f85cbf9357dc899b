"""onnxruntime-genai running an ONNX export folder as it is (its genai_config.json): what an app calling
og.Model / og.Generator gets, timed by `bench --runtime stock`.

Its own generation loop, greedy: `append_tokens(prompt)` runs the prompt, and each `generate_next_token()`
runs the model on the token chosen before (if not run yet) and chooses the next one. So the time to the
first token is append_tokens plus the first generate_next_token, and each later call is one decode step.
min_length = max_length = prompt + new tokens: genai masks EOS until then, so a run never stops early.
"""
from __future__ import annotations

import json
import time
from typing import Sequence

from ..install import INSTALL
from . import STOCK_RUNTIMES
from .base import StockRunner, TimedRun

NAME = "onnxruntime-genai"


def _app_entry(manifest: dict) -> dict:
    return (manifest.get("app_runtimes") or {}).get(NAME) or {}


@STOCK_RUNTIMES.register(NAME)
class GenaiRunner(StockRunner):
    name = NAME
    target = "onnx"
    module = "onnxruntime_genai"
    install = INSTALL["onnxruntime_genai"]
    packages = ("onnxruntime-genai", "onnxruntime")

    @classmethod
    def refusal(cls, manifest: dict) -> str | None:
        entry = _app_entry(manifest)
        if manifest["target"] == cls.target and not entry.get("config"):
            return entry.get("why") or f"the export has no {NAME} config (made before slm-export wrote one); export it again"
        return super().refusal(manifest)

    @staticmethod
    def import_sdk() -> None:
        import onnxruntime_genai  # noqa: F401

    def __init__(self, folder, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(self.folder))  # reads the folder's genai_config.json
        # The same threads as our runner (genai's default would be one per core).
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        self._model = og.Model(config)
        self.capacity = 0  # positions of the last generator's KV cache (genai allocates max_length)

    def timed_generate(self, prompt_ids: Sequence[int], new_tokens: int, prompt_text: str | None = None) -> TimedRun:
        og = self._og
        total = len(prompt_ids) + new_tokens
        self.check_room(total)
        params = og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(self._model, params)  # a new conversation: an empty cache of `total` positions
        self.capacity = total
        t = time.perf_counter()
        gen.append_tokens(list(prompt_ids))
        gen.generate_next_token()
        ttft = (time.perf_counter() - t) * 1000
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append((time.perf_counter() - t) * 1000)
        made = gen.token_count() - len(prompt_ids)
        if made != new_tokens or not gen.is_done():
            raise RuntimeError(f"{NAME} generated {made} tokens where {new_tokens} were asked for")
        return TimedRun(ttft, steps)
