"""Random-weight bf16 Hugging Face checkpoints in the real configs of 1-3B models, written tensor by tensor.

    python benchmarks/big_checkpoints.py NAME OUT_DIR        # one checkpoint (numpy only: no torch, no model)

Each checkpoint is what a user downloads from the hub: config.json (the real model's values), bf16 weights
in two or more safetensors shards with model.safetensors.index.json, and a tokenizer. Weights are seeded
N(0, 0.02) (norms 1, Qwen's q/k/v biases N(0, 0.02) too): export memory and decode speed do not depend on
weight values, and the real checkpoints are not downloadable here. Each tensor is generated in chunks of
rows and written straight into its shard, so the builder's own memory stays a few hundred MB at any size.

The tokenizer is SmolLM2's (copied from TOKENIZER, made once from the bundled GGUF): Llama 3.2's and
Qwen2.5's are not on this machine, and the ids it makes (< 49,152) are valid in the 128,256- and
151,936-entry vocabularies. Quality is never computed for these models (random weights have no text to
be faithful to).
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

# The real config.json values (hub ids in the comments); the -Instruct models share the base's shapes.
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
CONFIGS = {
    "llama3.2-1b-bf16": dict(  # meta-llama/Llama-3.2-1B-Instruct
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA32_ROPE,
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "qwen2.5-1.5b-bf16": dict(  # Qwen/Qwen2.5-1.5B-Instruct
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        hidden_act="silu", use_sliding_window=False, sliding_window=32768, max_window_layers=21,
        bos_token_id=151643, eos_token_id=151645),
    "llama3.2-3b-bf16": dict(  # meta-llama/Llama-3.2-3B-Instruct
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA32_ROPE,
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "smollm2-360m-bf16": dict(  # HuggingFaceTB/SmolLM2-360M-Instruct: the quick shape
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=960, intermediate_size=2560,
        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2),
}
SEED = 0
CHUNK = 1 << 23  # elements generated at once (32 MB of float32)
TOKENIZER = "_tokenizer-smollm2"  # under the work folder, beside the checkpoints


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every weight, in the order a Hugging Face checkpoint lists them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = cfg["model_type"] == "qwen2"  # Qwen2 has q/k/v biases, Llama none
    out = [("model.embed_tokens.weight", (v, h), "normal")]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,), "ones")]
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out += [(p + f"self_attn.{proj}.weight", (rows, h), "normal")]
            out += [(p + f"self_attn.{proj}.bias", (rows,), "normal")] if bias else []
        out += [(p + "self_attn.o_proj.weight", (h, q), "normal"),
                (p + "post_attention_layernorm.weight", (h,), "ones"),
                (p + "mlp.gate_proj.weight", (i, h), "normal"), (p + "mlp.up_proj.weight", (i, h), "normal"),
                (p + "mlp.down_proj.weight", (h, i), "normal")]
    out += [("model.norm.weight", (h,), "ones")]
    out += [] if cfg["tie_word_embeddings"] else [("lm_head.weight", (v, h), "normal")]
    return out


def shards(items: list, n_min: int = 2, max_bytes: int = 2 * 10**9) -> list[list]:
    """The tensors split in order into max(n_min, size / max_bytes) shards of about equal bytes."""
    sizes = [2 * math.prod(shape) for _, shape, _ in items]
    n = max(n_min, math.ceil(sum(sizes) / max_bytes))
    target, out, acc = sum(sizes) / n, [[]], 0
    for item, size in zip(items, sizes):
        if out[-1] and acc + size / 2 > target * len(out) and len(out) < n:
            out.append([])
        out[-1].append(item)
        acc += size
    return out


def bf16_chunks(name: str, shape: tuple, init: str):
    """The tensor's bf16 bytes, a few MB at a time (round to nearest even from float32)."""
    import numpy as np

    count = math.prod(shape)
    if init == "ones":
        yield np.full(count, 0x3F80, dtype="<u2").tobytes()
        return
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    for start in range(0, count, CHUNK):
        x = rng.standard_normal(min(CHUNK, count - start), dtype=np.float32)
        x *= 0.02
        u = x.view(np.uint32)
        yield ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def write_shard(path: Path, items: list) -> dict:
    """One safetensors file written tensor by tensor; {name: bytes} of what it holds."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in items:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, init in items:
            for chunk in bf16_chunks(name, shape, init):
                f.write(chunk)
    return {name: 2 * math.prod(shape) for name, shape, _ in items}


def build(name: str, out: Path) -> None:
    """The checkpoint `name` in out (written as out.tmp, then renamed: never half-written under its name)."""
    cfg = CONFIGS[name]
    tokenizer = out.parent / TOKENIZER
    if not (tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"{tokenizer} has no tokenizer.json: make it first (streaming_export.py does)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups = shards(tensors(cfg))
    weight_map, total = {}, 0
    for k, items in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        for tensor, size in write_shard(tmp / file, items).items():
            weight_map[tensor] = file
            total += size
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16", "dtype": "bfloat16",
                                                 "initializer_range": 0.02, "use_cache": True}, indent=2))
    for f in tokenizer.iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def save_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer files, from the bundled GGUF (transformers reads the tokenizer alone, no weights)."""
    from transformers import AutoTokenizer

    from slm_export.loading import default_gguf_path

    gguf = default_gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in [*CONFIGS, "tokenizer"]:
        sys.exit(f"usage: big_checkpoints.py {{{','.join(CONFIGS)}|tokenizer}} OUT_DIR")
    target = Path(sys.argv[2]).absolute()
    if sys.argv[1] == "tokenizer":
        save_tokenizer(target)
    else:
        tokenizer = target.parent / TOKENIZER
        if not (tokenizer / "tokenizer.json").is_file():  # made once, in its own process (transformers stays out of this one)
            import subprocess

            shutil.rmtree(tokenizer.with_name(tokenizer.name + ".tmp"), ignore_errors=True)
            subprocess.run([sys.executable, __file__, "tokenizer", str(tokenizer)], check=True)
        build(sys.argv[1], target)
