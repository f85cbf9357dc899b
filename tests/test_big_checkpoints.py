"""benchmarks/big_checkpoints.py: a sharded bf16 checkpoint written tensor by tensor, as transformers reads it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

import big_checkpoints  # noqa: E402

TINY_QWEN = dict(big_checkpoints.CONFIGS["qwen2.5-1.5b-bf16"], hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def test_sharded_bf16_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(big_checkpoints.CONFIGS, "tiny-qwen", TINY_QWEN)
    monkeypatch.setattr(big_checkpoints, "CHUNK", 1000)  # several chunks per matrix
    (tmp_path / big_checkpoints.TOKENIZER).mkdir()
    (tmp_path / big_checkpoints.TOKENIZER / "tokenizer.json").write_text("{}")
    big_checkpoints.build("tiny-qwen", tmp_path / "ckpt")

    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 2 and not (tmp_path / "ckpt.tmp").exists()
    expected = {name: shape for name, shape, _ in big_checkpoints.tensors(TINY_QWEN)}
    seen = {}
    for f in files:
        with safe_open(tmp_path / "ckpt" / f, "pt") as st:
            seen.update({k: st.get_tensor(k) for k in st.keys()})
    assert {k: tuple(v.shape) for k, v in seen.items()} == expected
    assert all(v.dtype == torch.bfloat16 for v in seen.values())
    assert index["metadata"]["total_size"] == 2 * sum(v.numel() for v in seen.values())

    # the bytes are torch's own float32 -> bf16 rounding of the seeded draws, chunk after chunk
    name = "model.layers.1.mlp.down_proj.weight"
    rng = np.random.default_rng([big_checkpoints.SEED, __import__("zlib").crc32(name.encode())])
    count = seen[name].numel()
    draws = np.concatenate([rng.standard_normal(min(1000, count - s), dtype=np.float32) for s in range(0, count, 1000)])
    assert torch.equal(seen[name].flatten(), (torch.from_numpy(draws) * 0.02).to(torch.bfloat16))
    assert torch.equal(seen["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert model.dtype == torch.bfloat16 and model.config.rope_parameters["rope_theta"] == TINY_QWEN["rope_theta"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, seen[name])
