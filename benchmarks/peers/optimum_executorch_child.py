"""Run an optimum-executorch .pte with the ExecuTorch runtime's Python bindings; runs in the peer's venv.

    python optimum_executorch_child.py CONFIG_JSON      (see protocol.child_main)

The program (`optimum-cli export executorch --recipe xnnpack --use_custom_sdpa --use_custom_kv_cache`)
has a `forward(input_ids [1, n], cache_position [n]) -> logits [1, n, vocab]` method whose KV
cache lives inside the program (mutable buffers, get_max_seq_len long), plus constant metadata
methods. Exported with a dynamic sequence length (its default), a prompt is one call (in chunks
only past the method's size limit, max_seq_len - 1); exported with static shapes (n == 1) every
token is its own call. Positions are passed in, so reset() only moves back to position 0: the
custom SDPA reads the cache up to the current position, and whatever a previous run left beyond
it is overwritten before it is read.

Imports happen here, at module level, so protocol.child_main's baseline RSS includes them: the
ExecuTorch bindings link libtorch, and torch builds the input tensors. transformers is not imported.
"""
from __future__ import annotations

import sys
from importlib import metadata

import numpy as np
import torch
from executorch.extension.pybindings import portable_lib
import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  llama::custom_sdpa / update_cache kernels
import executorch.kernels.quantized  # noqa: F401  quantized_decomposed::embedding_byte etc.
from executorch.runtime import Runtime

import protocol


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


class OptimumSession(protocol.Session):
    def __init__(self, artifact: str, threads: int):
        portable_lib._unsafe_reset_threadpool(threads)  # the pool XNNPACK and the custom ops run on
        got = portable_lib._threadpool_get_thread_count()
        if got != threads:
            raise RuntimeError(f"ExecuTorch threadpool has {got} threads after asking for {threads}")
        torch.set_num_threads(threads)  # torch computes nothing here; keep its pool from outnumbering ours
        self.program = Runtime.get().load_program(artifact)
        names = set(self.program.method_names)
        if "forward" not in names:
            raise RuntimeError(f"{artifact} has no forward method (methods: {sorted(names)})")
        self.meta = {n: self._constant(n) for n in sorted(names - {"forward"})}
        self.method = self.program.load_method("forward")
        mm = self.method.metadata
        if mm.num_inputs() != 2:
            raise RuntimeError(f"forward takes {mm.num_inputs()} inputs; expected (input_ids, cache_position)")
        # Sizes in the method's metadata are the upper bounds of dynamic dimensions.
        self.chunk = int(mm.input_tensor_meta(0).sizes()[1])
        self.capacity = int(self.meta.get("get_max_seq_len", self.chunk + 1))
        self.position = 0

    def _constant(self, name: str):
        out = self.program.load_method(name).execute([])
        return out[0] if len(out) == 1 else list(out)

    def reset(self) -> None:
        self.position = 0

    def _run(self, ids: list[int], every: bool) -> np.ndarray:
        """ids at positions [position, position + len(ids)); logits of every one or of the last, [rows, vocab].

        The program returns logits for every input position; only the rows asked for are copied out
        of the runtime's buffer (a 512-token prompt's full logits are ~100 MB).
        """
        if self.position + len(ids) > self.capacity:
            raise RuntimeError(f"position {self.position} + {len(ids)} tokens exceeds the KV cache ({self.capacity})")
        tokens = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(self.position, self.position + len(ids), dtype=torch.long)
        logits = self.method.execute([tokens, pos])[0].reshape(len(ids), -1)
        self.position += len(ids)
        return (logits if every else logits[-1:]).numpy().copy()

    def _feed(self, ids: list[int], every: bool) -> np.ndarray:
        pieces = [self._run(ids[i:i + self.chunk], every) for i in range(0, len(ids), self.chunk)]
        return np.concatenate(pieces) if every and len(pieces) > 1 else pieces[-1]

    def feed(self, ids: list[int]) -> np.ndarray:
        return self._feed(ids, every=False)[-1]

    def feed_all(self, ids: list[int]) -> np.ndarray:
        return self._feed(ids, every=True)


def open_session(artifact: str, threads: int):
    session = OptimumSession(artifact, threads)
    versions = {d: _version(d) for d in ("executorch", "torch", "torchao", "optimum-executorch", "transformers")}
    versions.update(prefill="one call (dynamic length)" if session.chunk > 1 else "token by token (static shapes)",
                    max_seq_len=session.capacity, threadpool=portable_lib._threadpool_get_thread_count())
    return session, versions


if __name__ == "__main__":
    try:
        sys.exit(protocol.child_main(open_session))
    except Exception as e:  # one line on stderr for the parent's PeerError
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
