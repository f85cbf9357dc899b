"""A Hugging Face folder in PyTorch eager fp32 with DynamicCache, measured by protocol.py."""
from __future__ import annotations

import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from protocol import Session, child_main


class EagerSession(Session):
    def __init__(self, folder: str, threads: int):
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.reset()

    def reset(self) -> None:
        self.cache, self.pos = DynamicCache(), 0

    @torch.inference_mode()
    def _run(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True,
                         cache_position=torch.arange(self.pos, self.pos + len(ids)))
        self.pos += len(ids)
        return out.logits[0]

    def feed(self, ids: list[int]) -> np.ndarray:
        return self._run(ids)[-1].numpy()

    def feed_all(self, ids: list[int]) -> np.ndarray:
        return self._run(ids).numpy()


def open_session(artifact: str, threads: int):
    return EagerSession(artifact, threads), {"torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(child_main(open_session))
