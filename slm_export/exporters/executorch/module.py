"""The PyTorch program we export to ExecuTorch, built from the neutral `Decoder` description.

Built for export, not for training: the KV cache lives inside the program as mutable buffers
written in place by ExecuTorch's `llama::update_cache` op, and attention is its `llama::custom_sdpa`
(causal, grouped-query, reads only the filled part of the cache). That is what ExecuTorch's own LLM
path does: it keeps the exported graph small (no attention graph to trace and partition) and the
decode step fast. An fp16 cache uses our `slm::update_cache` / `slm::sdpa` instead (kv_ops.py),
which take fp32 activations and convert inside the kernel. Layers that need what custom_sdpa cannot do (Gemma-2's logit softcap and
sliding window) use an explicit attention over the cache instead.

Two methods, sharing the program's state (its mutable buffers, planned once for both: lower.py):
  `forward(tokens [1, S] int64, input_pos [1] int64) -> [1, vocab]` appends S tokens at position
  input_pos[0] and returns the logits of the last one: ExecuTorch's LLM runner contract
  (TextLLMRunner, the Android LlmModule, the iOS runner), which calls it for a prompt chunk and
  for each generated token. It also keeps the S rows' final hidden states in `hidden_rows`.
  `logits(rows [K] int64) -> [K, vocab]`: the logits of rows `rows` of what the last forward call
  appended, from `hidden_rows` (parity and perplexity need every row's; generating needs none).
A generating step pays one copy of S x hidden floats for the second method's sake; the final norm
and lm_head run for one row, as before.
"""
from __future__ import annotations

import torch
from torch import nn

from ...quantize.plan import EMBEDDING, LM_HEAD
from ..torch_parts import (embedding_module, float_tensor, float_weights, linear_module, lm_head_module,
                           rope_tables, rotate_half_matrix, scaled_rms_norm, weight_sources)


def _linear(lin, weights):
    """nn.Linear of a Decoder Linear: its quantized weight from `weights`, else a view of its float one
    (nothing writes into a module's weights here; `self.half()` makes new tensors)."""
    return linear_module(lin, weights(lin.sources[0], lin.rows), copy=False)


def _custom_ops() -> None:
    # Registers torch.ops.llama.* (export-time meta functions and the CPU kernels), and the out
    # variants of the quantized_decomposed ops that the int8 KV cache leaves outside the delegate.
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

    from .kv_ops import register

    register()


class RMSNorm(nn.Module):
    def __init__(self, weight, eps: float):
        super().__init__()
        self.weight = nn.Parameter(float_tensor(weight, copy=False), requires_grad=False)
        self.eps = eps
        # The mean of squares as a [hidden -> 1] matmul: XNNPACK runs it inside the delegate, where
        # a reduction op would split the delegate and need a layout pass at lowering time.
        h = self.weight.shape[0]
        self.register_buffer("mean_w", torch.full((1, h), 1.0 / h), persistent=False)

    def forward(self, x):
        return x * torch.rsqrt(nn.functional.linear(x * x, self.mean_w) + self.eps) * self.weight


class ScaledRMSNorm(RMSNorm):
    """RMSNorm for an fp16 program, rescaled so that no square overflows (torch_parts.scaled_rms_norm).

    The row max runs in XNNPACK as max.dim over a 4-D view and the mean as the [hidden -> 1] matmul,
    so the delegate stays whole.
    """

    def forward(self, x):
        hidden = x.shape[-1]

        def row_max(a):
            return torch.amax(a.view(1, -1, 1, hidden), dim=-1, keepdim=True).view(x.shape[:-1] + (1,))
        return scaled_rms_norm(x, self.weight, self.eps, row_max,
                               lambda sq: nn.functional.linear(sq, self.mean_w))


def _silu(x):
    # Written out (what the core-ATen decomposition would make of it) so that the exported graph has
    # no op left to decompose and the lowering skips a whole re-tracing pass (lower.py).
    return x * torch.sigmoid(x)


def _quantize_rows(x):
    """Per-row (last dim) asymmetric int8: (values, fp32 scales, int8 zero points), as
    custom_quantized_sdpa reads them."""
    ops = torch.ops.quantized_decomposed
    scale, zero = ops.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = ops.quantize_per_token.default(x, scale, zero, -128, 127, torch.int8)
    return q, scale.to(torch.float32), zero.to(torch.int8)


def _rotate(x, cos, sin, rot_t):
    return x * cos + torch.nn.functional.linear(x, rot_t) * sin


class Attention(nn.Module):
    def __init__(self, dec, layer, max_context: int, kv_bits: int = 32, weights=float_weights):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dec.num_heads, dec.num_kv_heads, dec.head_dim
        self.scale = float(dec.attn_scale)
        self.softcap = float(dec.attn_softcap)
        self.window = layer.sliding_window if layer.sliding_window and layer.sliding_window < max_context else None
        q, k, v = layer.qkv.parts()
        self.q, self.k, self.v = _linear(q, weights), _linear(k, weights), _linear(v, weights)
        self.o = _linear(layer.o, weights)
        shape = (1, max_context, self.kv_heads, self.head_dim)
        # int8 cache: each cached row (one token, one head) is int8 with its own fp32 scale and
        # int8 zero point, read by custom_quantized_sdpa; a quarter of the fp32 cache's memory.
        self.kv_int8 = kv_bits == 8 and not self.explicit
        self.kv_fp16 = kv_bits == 16 and not self.explicit
        dtype = torch.int8 if self.kv_int8 else torch.float16 if self.kv_fp16 else torch.float32
        # persistent=False: the cache is state, not weights; ExecuTorch plans it as a mutable buffer.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        if self.kv_int8:
            row = (1, max_context, self.kv_heads, 1)
            for name in ("k", "v"):
                self.register_buffer(f"{name}_scales", torch.ones(row), persistent=False)
                self.register_buffer(f"{name}_zeros", torch.zeros(row, dtype=torch.int8), persistent=False)

    @property
    def explicit(self) -> bool:
        return bool(self.softcap) or self.window is not None

    def forward(self, x, cos, sin, rot_t, start: int, seq: int):
        q_size = self.heads * self.head_dim
        # -1, not `seq`, for the dynamic length: XNNPACK takes a reshape with one -1 but none with a
        # symbolic size, and a reshape it refuses splits the layer into two delegates.
        q = _rotate(self.q(x).view(1, -1, self.heads, self.head_dim), cos, sin, rot_t)
        k = _rotate(self.k(x).view(1, -1, self.kv_heads, self.head_dim), cos, sin, rot_t)
        v = self.v(x).view(1, -1, self.kv_heads, self.head_dim)
        if self.kv_int8:
            y = self._int8_cache_attention(q, k, v, start)
            return self.o(y.reshape(1, -1, q_size))
        if self.kv_fp16:
            torch.ops.slm.update_cache(k, self.k_cache, start)
            torch.ops.slm.update_cache(v, self.v_cache, start)
            y = torch.ops.slm.sdpa(q, self.k_cache, self.v_cache, start, self.scale)
            return self.o(y.reshape(1, -1, q_size))
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        if self.explicit:
            y = self._explicit_attention(q, start, seq)
        else:
            y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0, True, self.scale)
        return self.o(y.reshape(1, -1, q_size))

    def _int8_cache_attention(self, q, k, v, start: int):
        k8, k_scale, k_zero = _quantize_rows(k)
        v8, v_scale, v_zero = _quantize_rows(v)
        for value, cache in ((k8, self.k_cache), (k_scale, self.k_scales), (k_zero, self.k_zeros),
                             (v8, self.v_cache), (v_scale, self.v_scales), (v_zero, self.v_zeros)):
            torch.ops.llama.update_cache(value, cache, start)
        q8, q_scale, q_zero = _quantize_rows(q)
        return torch.ops.llama.custom_quantized_sdpa(
            q8, self.k_cache, self.v_cache, start, None, 0, True, self.scale,
            q_zero, q_scale, self.k_zeros, self.k_scales, self.v_zeros, self.v_scales)

    def _explicit_attention(self, q, start: int, seq: int):
        end = start + seq
        k = self.k_cache[:, :end].transpose(1, 2)  # [1, kv_heads, end, d]
        v = self.v_cache[:, :end].transpose(1, 2)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q.transpose(1, 2) @ k.transpose(2, 3)) * self.scale  # [1, heads, seq, end]
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        q_pos = torch.arange(seq).unsqueeze(1) + start
        k_pos = torch.arange(end).unsqueeze(0)
        allowed = k_pos <= q_pos
        if self.window is not None:
            allowed = allowed & (k_pos > q_pos - self.window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2)  # [1, seq, heads, d]


class Block(nn.Module):
    def __init__(self, dec, layer, max_context: int, kv_bits: int, norm=RMSNorm, weights=float_weights):
        super().__init__()
        eps = dec.rms_eps
        self.attn_norm = norm(layer.attn_norm, eps)
        self.attn = Attention(dec, layer, max_context, kv_bits, weights)
        self.ffn_norm = norm(layer.ffn_norm, eps)
        gate, up = layer.gate_up.parts()
        self.gate, self.up = _linear(gate, weights), _linear(up, weights)
        self.down = _linear(layer.down, weights)
        self.post_attn_norm = norm(layer.post_attn_norm, eps) if layer.post_attn_norm is not None else None
        self.post_ffn_norm = norm(layer.post_ffn_norm, eps) if layer.post_ffn_norm is not None else None
        self.act = _silu if dec.activation == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x, cos, sin, rot_t, start: int, seq: int):
        h = self.attn(self.attn_norm(x), cos, sin, rot_t, start, seq)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.ffn_norm(x)
        h = self.down(self.act(self.gate(h)) * self.up(h))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class ExportableDecoder(nn.Module):
    """The program: embedding, layers, norm, lm_head, KV caches as buffers.

    float16=True makes the whole program fp16 (weights, activations, cache; logits returned as
    fp32): XNNPACK takes no dtype conversion inside a delegate, so a mixed program would split it
    at every cast. Its norms rescale (ScaledRMSNorm) and its attention is slm::sdpa over an fp16
    cache, which widens q and computes in fp32.

    `weights(source, rows, embedding)` gives the quantized tensor of a weight (quant.quantized_weights)
    or None to keep it float; the float ones are views of the Decoder's arrays, read once each.
    """

    def __init__(self, dec, max_context: int, kv_bits: int = 32, float16: bool = False, chunk: int | None = None,
                 weights=float_weights):
        super().__init__()
        _custom_ops()
        if float16 and kv_bits != 16:
            raise ValueError("an fp16 program keeps an fp16 KV cache (kv_bits=16)")
        norm = ScaledRMSNorm if float16 else RMSNorm
        self.max_context = max_context
        self.embed_tokens = embedding_module(dec, weights(EMBEDDING, None, embedding=True), copy=False)
        self.embed_scale = float(dec.embed_scale)
        self.layers = nn.ModuleList(Block(dec, layer, max_context, kv_bits, norm, weights) for layer in dec.layers)
        self.sources = weight_sources(self.layers)
        self.norm = norm(dec.final_norm, dec.rms_eps)
        self.lm_head = lm_head_module(dec, weights(LM_HEAD, None), copy=False)
        self.final_softcap = float(dec.final_softcap)
        cos, sin = rope_tables(dec, max_context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rot_t", rotate_half_matrix(dec.head_dim).t().contiguous(), persistent=False)
        self.head_dim = dec.head_dim
        # The rows of the last forward call (chunk: the most tokens one call takes), read by `logits`:
        # state like the KV cache, written by the same library's op as the cache (llama::, or slm:: with an
        # fp16 cache), so the program needs no kernel library more.
        self.chunk = chunk or max_context
        self.register_buffer("hidden_rows", torch.zeros(1, self.chunk, 1, dec.hidden_size), persistent=False)
        self.write_rows = torch.ops.slm.update_cache if kv_bits == 16 else torch.ops.llama.update_cache
        if float16:
            self.half()

    def forward(self, tokens, input_pos):
        seq = tokens.shape[1]
        # What `.item()` decomposes to, written directly for the same reason as `_silu`.
        start = torch.ops.aten._local_scalar_dense.default(input_pos[0])
        torch._check(start >= 0)
        torch._check(start + seq <= self.max_context)
        torch._check(seq <= self.chunk)
        cos = self.rope_cos.narrow(0, start, seq).view(1, -1, 1, self.head_dim)
        sin = self.rope_sin.narrow(0, start, seq).view(1, -1, 1, self.head_dim)
        x = self.embed_tokens(tokens)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        for layer in self.layers:
            x = layer(x, cos, sin, self.rot_t, start, seq)
        self.write_rows(x.view(1, -1, 1, x.shape[-1]), self.hidden_rows, 0)
        return self._head(x[:, -1])

    def logits(self, rows):
        # index_select first: an op of the buffer alone would be folded into a constant at lowering,
        # as this method only reads the buffer (forward writes it).
        return self._head(self.hidden_rows.index_select(1, rows).view(-1, self.hidden_rows.shape[-1]))

    def read_by_both_methods(self) -> list:
        """The tensors `logits` reads as `forward` does: the final norm's and the lm_head's weights (a
        torchao weight as the plain tensors it holds)."""
        out = []
        for w in (self.norm.weight, self.lm_head.weight):
            names = w.__tensor_flatten__()[0] if hasattr(w, "__tensor_flatten__") else None
            out += [getattr(w, n) for n in names] if names else [w]
        return out

    def _head(self, x):
        logits = self.lm_head(self.norm(x))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()  # a no-op in an fp32 program; fp16 programs return fp32 logits too
