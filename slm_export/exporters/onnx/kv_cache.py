"""An int8 KV cache for the ONNX graph (`--kv-bits 8`): calibrated static scales, one per channel.

onnxruntime's CPU GroupQueryAttention keeps the cache as int8 when given `k_scale` / `v_scale` and
`kv_cache_bit_width=8`: it quantizes each new key/value row on write (symmetric, round to nearest,
clamped to +-127) and dequantizes inside its attention kernels. Its scales are static graph
inputs, so they are calibrated here: the finished fp32-cache graph runs a calibration text in
onnxruntime, and each (layer, kv head, channel) gets max |value| * MARGIN / 127.

Why per channel: keys of small LMs carry a few channels tens of times larger than the rest (and
RoPE rotates pairs of channels, so a channel's range does not depend on the position). Why a margin:
values outside the calibrated range are clipped; on SmolLM2-135M int4 (first 512 tokens of the
shipped passage, same weights with the fp32 cache as reference) margins of 0.8 / 1.0 / 1.3 / 1.6 /
2.0 / 3.0 gave mean KL 0.032 / 0.0087 / 0.0066 / 0.0071 / 0.0084 / 0.012: clipping costs more
than resolution up to about 1.3.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MARGIN = 1.3
CALIBRATION_TOKENS = 1024
SCALE_FLOOR = 1e-6  # a channel that was always 0 still needs a positive scale


def calibration_scales(model_path: Path, ids: list[int], layers: int, kv_heads: int, head_dim: int,
                       threads: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(k_scale, v_scale) per layer, each float32 [1, kv_heads, 1, head_dim], from one prefill of ids."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "logits_to_keep": np.array([1], np.int64)}
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    feeds.update({n.replace("present", "past_key_values"): empty for n in names})
    present = session.run(names, feeds)
    scale = [np.maximum(np.abs(p).max(axis=2, keepdims=True) * MARGIN / 127, SCALE_FLOOR).astype(np.float32)
             for p in present]
    return [(scale[2 * i], scale[2 * i + 1]) for i in range(layers)]


def use_int8_cache(model, scales: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Turn the graph's fp32 KV cache into GroupQueryAttention's int8 one with these scales (in place)."""
    import onnx
    from onnx import numpy_helper

    for value in list(model.graph.input) + list(model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if len(attention) != len(scales):
        raise ValueError(f"{len(attention)} attention nodes but {len(scales)} layers of scales")
    for i, (node, (k_scale, v_scale)) in enumerate(zip(attention, scales)):
        names = (f"layers.{i}.attn.k_scale", f"layers.{i}.attn.v_scale")
        model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip((k_scale, v_scale), names))
        while len(node.input) < 12:  # inputs 9-11 (position_ids, attention_bias, head_sink) stay empty
            node.input.append("")
        node.input.extend(names)  # inputs 12, 13
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
