"""The PyTorch program we convert to Core ML, built from the neutral `Decoder` description.

Its names are the ones Hugging Face's swift-transformers looks up (Sources/Models/LanguageModel.swift,
`LanguageModel.Keys`), so the package loads as its `LanguageModelWithStatefulKVCache`:
`forward(inputIds [1, q] int32, causalMask [1, 1, m, end] float16) -> logits [1, q, vocab]` appends
q tokens (1 <= q <= the query range) and returns their logits. Like Apple's and Hugging Face's stateful
Mistral / Llama exports, the cache position comes from the mask's shape: the new tokens go to slots
[end - q, end). Only the mask's shape is read (swift-transformers sends zeros of shape
[1, 1, 1, tokens + 1]); the causal and sliding-window masks are built here from the positions.

The KV cache is two registered buffers, `keyCache` and `valueCache`, each
[layers, kv_heads, max_context, head_dim] float16. torch.export records the in-place writes as
buffer mutations and coremltools turns them into Core ML state (`ct.StateType`) named after the
buffers, updated in place by the model; the app creates it once per conversation with `makeState()`.
Core ML states are float16 only, so the buffers are float16 here too and the PyTorch program computes
with exactly what Core ML stores.

Attention reads the whole fixed-size cache with a causal mask built from the positions (static
shapes, as Core ML prefers); rows past the current position are masked out, and so are slots before
it that were never written. makeState() zeroes the state, and a written key is never all zeros, so a
slot of zeros is a hole: swift-transformers' mask is one wider than the tokens it has, which leaves
slot 0 empty and shifts every position by one (RoPE depends only on the offset between positions).

float16 compute: small LMs carry hidden-state entries in the hundreds, whose squares overflow
float16 (max 65504) inside RMSNorm. The norm here divides by the row's largest magnitude first,
which is exact algebra (see RMSNorm) and keeps every intermediate in [0, 1]. Queries are scaled
before the q.k product, so attention scores stay as small as the softmax needs.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SlmExportError
from ...quantize.plan import EMBEDDING, LM_HEAD
from ..torch_parts import (embedding_module, float_weights, linear_module, lm_head_module, rope_tables,
                           rotate_half_matrix, scaled_rms_norm, weight_sources)

CACHE_DTYPE = torch.float16  # Core ML state tensors are float16
# The Core ML feature names: forward's arguments, the output, the cache buffers (-> states). They are
# swift-transformers' `LanguageModel.Keys` (inputIds, causalMask, logits, keyCache, valueCache).
INPUTS = ("inputIds", "causalMask")
OUTPUT = "logits"
STATES = ("keyCache", "valueCache")


class RMSNorm(nn.Module):
    """x / rms(x) * w, rescaled by each row's largest magnitude so that float16 cannot overflow
    (torch_parts.scaled_rms_norm); in float32 the same algebra gives the same norm."""

    def __init__(self, weight, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight).clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return scaled_rms_norm(x, self.weight, self.eps, lambda a: a.amax(-1, keepdim=True),
                               lambda sq: sq.mean(-1, keepdim=True))


def _linear(lin, weights):
    """nn.Linear of a Decoder Linear: its quantized weight from `weights`, else a copy of its float one."""
    return linear_module(lin, weights(lin.sources[0], lin.rows))


class Attention(nn.Module):
    def __init__(self, dec, layer, index: int, max_context: int, weights=float_weights):
        super().__init__()
        self.index = index
        self.heads, self.kv_heads, self.head_dim = dec.num_heads, dec.num_kv_heads, dec.head_dim
        self.scale = float(dec.attn_scale)
        self.softcap = float(dec.attn_softcap)
        self.window = layer.sliding_window if layer.sliding_window and layer.sliding_window < max_context else None
        q, k, v = layer.qkv.parts()
        self.q, self.k, self.v = _linear(q, weights), _linear(k, weights), _linear(v, weights)
        self.o = _linear(layer.o, weights)

    def forward(self, x, cos, sin, rot_t, start, mask, key_cache, value_cache):
        q_len = x.shape[1]
        q = self.q(x).view(1, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(1, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(1, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + nn.functional.linear(q, rot_t) * sin
        k = k * cos + nn.functional.linear(k, rot_t) * sin
        # Write this step's keys and values into the state at their positions, then attend to all of it.
        # (A slice write at a runtime offset: coremltools turns it into an in-place state update.)
        key_cache[self.index, :, start:start + q_len] = k[0].to(CACHE_DTYPE)
        value_cache[self.index, :, start:start + q_len] = v[0].to(CACHE_DTYPE)
        keys = key_cache[self.index].unsqueeze(0).to(x.dtype)  # [1, kv_heads, max_context, head_dim]
        values = value_cache[self.index].unsqueeze(0).to(x.dtype)
        group = self.heads // self.kv_heads
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        scores = (q * self.scale) @ keys.transpose(2, 3)  # [1, heads, q, max_context]
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        y = (scores + mask).softmax(-1) @ values  # [1, heads, q, head_dim]
        return self.o(y.transpose(1, 2).reshape(1, q_len, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dec, layer, index: int, max_context: int, weights=float_weights):
        super().__init__()
        eps = dec.rms_eps
        self.attn_norm = RMSNorm(layer.attn_norm, eps)
        self.attn = Attention(dec, layer, index, max_context, weights)
        self.ffn_norm = RMSNorm(layer.ffn_norm, eps)
        gate, up = layer.gate_up.parts()
        self.gate, self.up = _linear(gate, weights), _linear(up, weights)
        self.down = _linear(layer.down, weights)
        self.post_attn_norm = RMSNorm(layer.post_attn_norm, eps) if layer.post_attn_norm is not None else None
        self.post_ffn_norm = RMSNorm(layer.post_ffn_norm, eps) if layer.post_ffn_norm is not None else None
        self.act = nn.SiLU() if dec.activation == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x, cos, sin, rot_t, start, masks, key_cache, value_cache):
        mask = masks[1] if self.attn.window is not None else masks[0]
        h = self.attn(self.attn_norm(x), cos, sin, rot_t, start, mask, key_cache, value_cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.ffn_norm(x)
        h = self.down(self.act(self.gate(h)) * self.up(h))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class CoreMLDecoder(nn.Module):
    """`weights(source, rows, embedding)`: a weight's quantized tensor (quant.module_weights), or None for a
    float copy of the Decoder's."""

    def __init__(self, dec, max_context: int, weights=None):
        super().__init__()
        weights = weights or float_weights
        self.max_context = max_context
        self.embed_tokens = embedding_module(dec, weights(EMBEDDING, None, embedding=True))
        self.embed_scale = float(dec.embed_scale)
        self.layers = nn.ModuleList(Block(dec, layer, i, max_context, weights) for i, layer in enumerate(dec.layers))
        windows = {b.attn.window for b in self.layers if b.attn.window is not None}
        if len(windows) > 1:
            raise SlmExportError(f"layers with different sliding windows {sorted(windows)} are not supported "
                                 "by the coreml target (one window mask is built per call)")
        self.window = windows.pop() if windows else None
        self.sources = weight_sources(self.layers)
        self.norm = RMSNorm(dec.final_norm, dec.rms_eps)
        self.lm_head = lm_head_module(dec, weights(LM_HEAD, None))
        self.final_softcap = float(dec.final_softcap)
        cos, sin = rope_tables(dec, max_context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rot_t", rotate_half_matrix(dec.head_dim).t().contiguous(), persistent=False)
        self.head_dim = dec.head_dim
        self.register_buffer("key_positions", torch.arange(max_context), persistent=False)
        cache = (dec.num_layers, dec.num_kv_heads, max_context, dec.head_dim)
        for name in STATES:
            self.register_buffer(name, torch.zeros(cache, dtype=CACHE_DTYPE), persistent=False)

    def caches(self):
        return [getattr(self, name) for name in STATES]

    def forward(self, inputIds, causalMask):  # noqa: N803 (the Core ML input names)
        q_len = inputIds.shape[1]
        end = causalMask.shape[-1]  # tokens in the cache after this call
        start = end - q_len
        torch._check(start >= 0)
        positions = torch.arange(q_len) + start  # [q] (index ops take int64)
        dtype = self.rope_cos.dtype
        cos = self.rope_cos.index_select(0, positions).view(1, 1, q_len, self.head_dim)
        sin = self.rope_sin.index_select(0, positions).view(1, 1, q_len, self.head_dim)
        # Additive masks [q, max_context]: causal, and causal within the sliding window.
        offset = self.key_positions.view(1, -1) - positions.view(-1, 1)  # key - query position
        big = torch.tensor(-3e4 if dtype == torch.float16 else -1e9, dtype=dtype)  # finite: fp16-safe
        zero = torch.zeros((), dtype=dtype)
        causal = torch.where(offset <= 0, zero, big)
        # slots before `start` never written (all-zero keys in layer 0): masked (see the module docstring)
        key_cache, value_cache = self.caches()
        hole = key_cache[0].abs().amax(dim=(0, 2)) == 0  # [max_context]
        causal = torch.where(self.key_positions < start, torch.where(hole, big, causal), causal)
        # (nested where, not `&`: coremltools has no converter for a bool tensor `and`)
        masks = (causal, torch.where(offset > -self.window, causal, big) if self.window else causal)
        x = self.embed_tokens(inputIds)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        for layer in self.layers:
            x = layer(x, cos, sin, self.rot_t, start, masks, key_cache, value_cache)
        logits = self.lm_head(self.norm(x))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
