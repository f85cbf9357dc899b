"""A GGUF under llama-cpp-python, measured by protocol.py; runs inside the llama.cpp venv.

    python llamacpp_child.py CONFIG_JSON     (see protocol.child_main)

The context is 2,048 positions, as our exporters' default KV cache.
"""
from __future__ import annotations

import sys

import llama_cpp
import numpy as np  # a dependency of llama-cpp-python
from llama_cpp import Llama

from protocol import Session, child_main


class LlamaSession(Session):
    def __init__(self, path: str, threads: int):
        self.llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False, logits_all=False)
        self.n_vocab = self.llm.n_vocab()

    def reset(self) -> None:
        # llm.reset() alone only rewinds llama-cpp-python's token count: empty the KV cache too.
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        if llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(self.llm._ctx.ctx), 0) != -1:
            raise RuntimeError("llama.cpp KV cache not empty after clearing")

    def feed(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        # The last token's logits, read from the context: with logits_all=False llama-cpp-python
        # >= 0.3 no longer copies them into llm.scores (it stays zeros).
        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()


def open_session(artifact: str, threads: int):
    return LlamaSession(artifact, threads), {"llama_cpp_python": llama_cpp.__version__}


if __name__ == "__main__":
    sys.exit(child_main(open_session))
