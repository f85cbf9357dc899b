"""The runner interface every runtime implements (ours: `Runner`; an app's own: `StockRunner`), and generation on top of it."""
from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..errors import SlmExportError


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TimedRun(NamedTuple):
    """One greedy generation, timed: prompt in to first token out, then each further token."""

    ttft_ms: float
    step_ms: list[float]  # one per token after the first


class _Loaded(ABC):
    """What `bench` measures (runtimes/measure.py): a loaded artifact that generates greedily, timed."""

    packages: tuple[str, ...] = ()  # distributions whose versions a result records
    # True when the runtime's Python bindings load libtorch themselves (ExecuTorch's do): the
    # measuring process then allows torch, and its baseline RSS reading includes it.
    imports_torch = False
    takes_text = False  # True: it takes the prompt as text and tokenizes it itself

    def __init__(self, folder: Path, manifest: dict, threads: int | None):
        self.folder, self.manifest = Path(folder), manifest
        self.threads = threads or default_threads()
        self.max_context = int(manifest["max_context"])
        self.position = 0

    @classmethod
    def check_available(cls) -> None:
        """Raise RuntimeUnavailable when this runtime cannot execute on this machine."""

    @staticmethod
    def import_sdk() -> None:
        """Import the runtime's SDK (so a baseline memory reading can include it)."""

    @abstractmethod
    def timed_generate(self, prompt_ids: Sequence[int], new_tokens: int, prompt_text: str | None = None) -> TimedRun:
        """Greedy generation of exactly `new_tokens` tokens after `prompt_ids` (no stop at EOS) in a new
        conversation: its time to the first token and the time of each further token. `prompt_text`: the
        same prompt as text, for a runtime that takes text (`takes_text`)."""

    def check_room(self, n_new: int) -> None:
        if self.position + n_new > self.max_context:
            raise SlmExportError(
                f"{self.position + n_new} tokens exceed the artifact's max context of {self.max_context}; "
                "use a shorter prompt or fewer new tokens, or re-export with a larger --max-context"
            )


class Runner(_Loaded):
    """A loaded artifact with one KV cache. `forward` appends tokens and returns their logits."""

    # True when loading the runtime into a process that holds other libraries can break it (the
    # torch-free ExecuTorch runner): open_runner then runs it in a child process (runtimes/child.py).
    needs_own_process = False
    # True when the runner needs only the packages' own files, not what they declare (ExecuTorch's wheel
    # declares torch; the torch-free runner uses its C++ libraries only): provisioning a device uses --no-deps.
    pip_no_deps = False

    @abstractmethod
    def reset(self, capacity: int) -> None:
        """Start an empty cache with room for `capacity` tokens (grows if exceeded)."""

    @abstractmethod
    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `token_ids` to the cache; logits [n, vocab] for all of them, or [1, vocab] for the last."""

    def timed_generate(self, prompt_ids: Sequence[int], new_tokens: int, prompt_text: str | None = None) -> TimedRun:
        self.reset(len(prompt_ids) + new_tokens)
        t = time.perf_counter()
        tok = int(np.argmax(self.forward(prompt_ids)[-1]))
        ttft = (time.perf_counter() - t) * 1000
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            tok = int(np.argmax(self.forward([tok])[-1]))
            steps.append((time.perf_counter() - t) * 1000)
        return TimedRun(ttft, steps)


class StockRunner(_Loaded):
    """An app's own runtime running the export as it is, with its own generation loop (onnxruntime-genai,
    ExecuTorch's LLM runner): `bench --runtime stock` measures what an app calling it gets."""

    name = ""  # its name in STOCK_RUNTIMES, and in a result's `runtime`
    target = ""  # the export target whose folders it opens
    module = ""  # the Python module it imports
    install = ""  # the pip command that installs it

    @classmethod
    def check_available(cls) -> None:
        import importlib.util

        top = cls.module.split(".")[0]
        if importlib.util.find_spec(top) is None:
            raise SlmExportError(f"measuring in {cls.name} needs the Python package '{top}', which is not installed: "
                                 f"{cls.install}")

    @classmethod
    def refusal(cls, manifest: dict) -> str | None:
        """Why this runtime cannot run the artifact `manifest` describes (None: it can)."""
        if manifest["target"] != cls.target:
            return f"it runs {cls.target} exports, not {manifest['target']}"
        return None


def pick_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z < cut, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.size, p=p))


def generate(runner: Runner, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: set[int] = frozenset(),
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy (temperature 0) or sampled generation; stops at an EOS id or after max_new_tokens."""
    if not prompt_ids:
        raise SlmExportError("the prompt is empty (it encodes to no tokens); pass a non-empty --prompt")
    rng = np.random.default_rng(seed)
    runner.check_room(len(prompt_ids) + max_new_tokens)
    runner.reset(len(prompt_ids) + max_new_tokens)
    logits = runner.forward(prompt_ids)[-1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = pick_token(logits, temperature, top_k, top_p, rng)
        if tok in eos_ids:
            break
        out.append(tok)
        if on_token:
            on_token(tok)
        logits = runner.forward([tok])[-1]
    return out
