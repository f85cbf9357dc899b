"""ExecuTorch's own LLM runner (`TextLLMRunner`, the C++ behind Android's LlmModule and the iOS runner,
through its Python binding) running a .pte as it is: what an app gets, timed by `bench --runtime stock`.

It takes text and tokenizes it itself, so it gets the prompt's text; its stats then say how many tokens
that made, and a run whose count differs from the prompt's is refused. Greedy (temperature 0). The time to
the first token runs from the call to the first token's callback; each later callback ends one decode step
(the program, sampling, and decoding the piece, as in an app). The runner stops at the program's stop ids
and has no option to go past them: a run that stops early is an error naming where, not a short row.
The runner prints each piece on stdout as well; that goes to /dev/null here (the measuring process
answers on stdout). Its Python binding links libtorch, so this process's RSS includes it (see
`baseline_rss_mb`); the C++ runner in an app does not.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Sequence

from ..install import INSTALL
from . import STOCK_RUNTIMES
from .base import StockRunner, TimedRun

NAME = "executorch-llm-runner"
TOKENIZER = "tokenizer.json"


@STOCK_RUNTIMES.register(NAME)
class TextLLMRunnerStock(StockRunner):
    name = NAME
    target = "executorch"
    module = "executorch"
    install = INSTALL["executorch"]
    packages = ("executorch", "torch")
    imports_torch = True
    takes_text = True

    @classmethod
    def refusal(cls, manifest: dict) -> str | None:
        if manifest["target"] == cls.target:
            own = manifest.get("target_extra", {}).get("own_kernels") or []
            if own:
                return (f"its program calls slm-export's own kernels ({', '.join(own)}), which no ExecuTorch build "
                        "has; the default export (--kv-bits 32, float32) runs in it")
            if (manifest.get("tokenizer") or {}).get("file") != TOKENIZER:
                return f"it takes text and reads the model's {TOKENIZER}, which this export has not"
        return super().refusal(manifest)

    @staticmethod
    def import_sdk() -> None:
        from ..quiet import quiet_third_party

        quiet_third_party()
        import torch  # noqa: F401  (the binding needs libtorch loaded first)
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels
        from executorch.extension.llm.runner import TextLLMRunner  # noqa: F401
        from executorch.kernels import quantized  # noqa: F401  quantized embedding kernels

    def __init__(self, folder, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        self.import_sdk()
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(self.threads)  # one threadpool in the process, the runner's too
        self._config = GenerationConfig
        self._runner = TextLLMRunner(str(self.folder / manifest["model_file"]), str(self.folder / TOKENIZER))
        with _quiet_stdout():  # it loads the program at its first call: here, so that is load time, not TTFT
            self._runner.prefill(" ", config=GenerationConfig(echo=False, temperature=0.0))
        self.capacity = self.max_context  # the cache is in the program, sized at export

    def timed_generate(self, prompt_ids: Sequence[int], new_tokens: int, prompt_text: str | None = None) -> TimedRun:
        if prompt_text is None:
            raise RuntimeError(f"{NAME} takes the prompt as text, and none was given")
        self.check_room(len(prompt_ids) + new_tokens)
        config = self._config(echo=False, max_new_tokens=new_tokens, temperature=0.0)
        try:
            times, stats, t0 = self._generate(prompt_text, config, per_token=True)
        except UnicodeDecodeError:
            # The binding hands each piece to Python as str, and a piece that is part of a UTF-8 character
            # (a byte token) raises there. Run again without the callback: the runner's own Stats then time it.
            times, stats, t0 = self._generate(prompt_text, config, per_token=False)
        prompt_tokens = stats[0].num_prompt_tokens if stats else None
        if prompt_tokens != len(prompt_ids):
            raise RuntimeError(f"{NAME} encoded the {len(prompt_ids)}-token prompt's text to {prompt_tokens} tokens")
        made = len(times) if times else stats[0].num_generated_tokens + 1  # executorch 1.5 counts those after the first
        if made != new_tokens:
            raise RuntimeError(f"{NAME} stopped at a stop token after {made} of {new_tokens} tokens (it has no "
                               "option to go past one); use a prompt it continues further, or fewer --decode-tokens")
        if times:
            return TimedRun((times[0] - t0) * 1000, [(b - a) * 1000 for a, b in zip(times, times[1:])])
        s = stats[0]  # whole milliseconds, from the runner's clock: each step is the mean step
        decode_ms = s.inference_end_ms - s.first_token_ms
        if decode_ms <= 0:
            raise RuntimeError(f"{NAME}'s millisecond clock timed {new_tokens - 1} decode steps as {decode_ms} ms "
                               "(its pieces are not whole UTF-8, so it is timed by its own stats); use more --decode-tokens")
        return TimedRun(float(s.first_token_ms - s.inference_start_ms), [decode_ms / (new_tokens - 1)] * (new_tokens - 1))

    def _generate(self, prompt_text: str, config, per_token: bool):
        """(the time of each token's callback, the Stats, the start), from one generation."""
        times, stats = [], []
        callback = (lambda piece: times.append(time.perf_counter())) if per_token else None
        self._runner.reset()  # a new conversation
        with _quiet_stdout():
            t0 = time.perf_counter()
            self._runner.generate(prompt_text, config, token_callback=callback, stats_callback=stats.append)
        return times, stats, t0


@contextmanager
def _quiet_stdout():
    """The runner's own printing (each piece, on file descriptor 1) to /dev/null."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
