"""Calibration: the `Decoder` run on text, one layer at a time, collecting each weight's input statistics.

GPTQ (and any method in `CALIBRATED`) needs, for every linear weight, H = X^T X / n over its inputs X
on real text. This runs the neutral `Decoder` in plain PyTorch, layer by layer as GPTQ's reference
implementation does: the inputs of layer i come from layers 0..i-1 already quantized, and inside a
layer each weight's statistics are taken after the weights before it were quantized (q|k|v, then o,
then gate|up, then down), so each one compensates the error upstream of it. Only one layer's
activations and statistics exist at a time.

The default text is the shipped calibration passage (data/calibration.txt); `verify` and the quality
benchmark measure on a different one (data/passage.txt) that no export ever reads.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..stored import is_stored

CHUNK = 512  # tokens per calibration sequence (attention is causal within a chunk)
MAX_TOKENS = 2048  # calibration tokens used at most (measured on SmolLM2-135M: 4096 gave GPTQ no better KL)
MIN_TOKENS = 256
# Resident bytes per fp32 weight byte of the model while an export calibrates (GPTQ, mixed precision,
# ONNX --kv-bits 8 scales): the loaded model, the float32 copies this forward runs on, the dequantized
# weights put back into it and the codes made so far (slm_export/memory.py). Fitted to the default
# (GPTQ) int4 exports' peak RSS measured by benchmarks/export_memory.py on a 2-core AMD EPYC / 23.5 GiB
# Linux machine: ONNX 3125 and ExecuTorch 3179 MiB for SmolLM2-135M (513 MiB fp32), 9687 and 9924 for
# the Qwen2.5-0.5B shape (1884 MiB); estimates +0.3% and +5..7% over them.
CALIBRATION_PEAK = 5.25


def calibration_text() -> str:
    """The shipped calibration passage (not the passage verify and the benchmarks measure on)."""
    from importlib import resources

    return resources.files("slm_export").joinpath("data/calibration.txt").read_text()


def _t(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class DecoderForward:
    """The `Decoder` as plain PyTorch over whole sequences (no KV cache): what the exporters compute."""

    def __init__(self, dec, weights: dict[str, np.ndarray] | None = None):
        from .plan import decoder_weights

        self.dec = dec
        # in-memory weights as tensors sharing their arrays; weights still in the checkpoint (Stored)
        # are read when first used and dropped again by release()
        self.w = {name: arr if is_stored(arr) else _t(arr) for name, _, arr, _ in decoder_weights(dec)}
        self._stored = {name: arr for name, arr in self.w.items() if is_stored(arr)}
        self._fused: dict[tuple, object] = {}  # a fused Linear's parts stacked once (q|k|v), until set()
        if weights:
            self.set(weights)

    def set(self, weights: dict[str, np.ndarray]) -> None:
        """Use these weights from now on (a `Stored` one goes back to being read when used)."""
        self.w.update({k: v if is_stored(v) else _t(v) for k, v in weights.items()})
        self._fused = {key: w for key, w in self._fused.items() if not set(key) & set(weights)}

    def weight(self, name: str, keep: bool = True):
        """The weight as a tensor (one read from the checkpoint is kept until release(), unless keep=False)."""
        w = self.w[name]
        if is_stored(w):
            w = _t(w.read())
            if keep:
                self.w[name] = w
        return w

    def release(self, names) -> None:
        """Forget the float copies of these weights where they can be read again from the checkpoint."""
        names = set(names)
        self.set({n: self._stored[n] for n in names if n in self._stored})

    def release_layer(self, layer) -> None:
        self.release(s for lin in (layer.qkv, layer.o, layer.gate_up, layer.down) for s in lin.sources)

    # --- pieces
    def norm(self, x, weight):
        import torch

        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.dec.rms_eps) * _t(weight)

    def linear(self, x, lin):
        """x @ W^T (+ b) for a decoder Linear, its parts read by their own names."""
        import torch

        key = tuple(lin.sources)
        if key not in self._fused:
            self._fused[key] = torch.cat([self.weight(s) for s in key]).T if len(key) > 1 else self.weight(key[0]).T
        y = x @ self._fused[key]
        return y if lin.bias is None else y + _t(lin.bias)

    def rope(self, x, start: int = 0):
        import torch

        seq, d = x.shape[-2], x.shape[-1]
        cos, sin = _t(self.dec.rope_cos[start:start + seq]), _t(self.dec.rope_sin[start:start + seq])
        half = cos.shape[-1]
        rot = x[..., :2 * half]
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        return out if 2 * half == d else torch.cat([out, x[..., 2 * half:]], -1)

    def attention(self, layer, h):
        """Causal grouped-query attention of a batch of sequences h [b, t, hidden] (before o_proj)."""
        import torch

        dec = self.dec
        b, t, _ = h.shape
        qkv = self.linear(h, layer.qkv)
        q_size, kv_size = dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
        q = qkv[..., :q_size].view(b, t, dec.num_heads, dec.head_dim).transpose(1, 2)
        k = qkv[..., q_size:q_size + kv_size].view(b, t, dec.num_kv_heads, dec.head_dim).transpose(1, 2)
        v = qkv[..., q_size + kv_size:].view(b, t, dec.num_kv_heads, dec.head_dim).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        group = dec.num_heads // dec.num_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        if not dec.attn_softcap and not layer.sliding_window:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dec.attn_scale)
            return y.transpose(1, 2).reshape(b, t, q_size)
        scores = (q @ k.transpose(-1, -2)) * dec.attn_scale
        if dec.attn_softcap:
            scores = torch.tanh(scores / dec.attn_softcap) * dec.attn_softcap
        pos = torch.arange(t)
        allowed = pos[None, :] <= pos[:, None]
        if layer.sliding_window:
            allowed &= pos[None, :] > pos[:, None] - layer.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, q_size)

    def _rows(self, name: str, index):
        """Rows of a [vocab, hidden] table (a stored one is read, indexed and not kept)."""
        import torch

        w = self.w[name]
        return torch.from_numpy(w.take(np.asarray(index))) if is_stored(w) else w[index]

    def act(self, x):
        import torch

        if self.dec.activation == "silu":
            return x * torch.sigmoid(x)
        return torch.nn.functional.gelu(x, approximate="tanh")

    def embed(self, ids):
        x = self._rows("model.embed_tokens.weight", ids)
        return x * self.dec.embed_scale if self.dec.embed_scale != 1.0 else x

    def head_rows(self, rows):
        """The lm_head's rows `rows` as they are now (for `logits(head=...)`, read once for many states)."""
        return self._rows("lm_head.weight", rows)

    def logits(self, h, rows=None, head=None):
        """Logits of hidden states h (of vocabulary `rows` only, if given; `head`: those rows, read already)."""
        import torch

        if head is None:
            head = self.weight("lm_head.weight", keep=False) if rows is None else self._rows("lm_head.weight", rows)
        y = self.norm(h, self.dec.final_norm) @ head.T
        if self.dec.final_softcap:
            y = torch.tanh(y / self.dec.final_softcap) * self.dec.final_softcap
        return y

    def layer(self, layer, x, observe: Callable | None = None):
        """One decoder layer. `observe(unit, inputs)` is called before each weight group runs and may
        change the weights it uses (the quantizer replaces them with their quantized values)."""
        see = observe or (lambda unit, inputs: None)
        h = self.norm(x, layer.attn_norm)
        see("qkv", h)
        a = self.attention(layer, h)
        see("o", a)
        y = self.linear(a, layer.o)
        if layer.post_attn_norm is not None:
            y = self.norm(y, layer.post_attn_norm)
        x = x + y
        h = self.norm(x, layer.ffn_norm)
        see("gate_up", h)
        gu = self.linear(h, layer.gate_up)
        inter = gu.shape[-1] // 2
        m = self.act(gu[..., :inter]) * gu[..., inter:]
        see("down", m)
        y = self.linear(m, layer.down)
        if layer.post_ffn_norm is not None:
            y = self.norm(y, layer.post_ffn_norm)
        return x + y

    def __call__(self, ids):
        """Logits [b, t, vocab] for token ids [b, t]."""
        import torch

        with torch.no_grad():
            x = self.embed(torch.as_tensor(ids))
            for layer in self.dec.layers:
                x = self.layer(layer, x)
                self.release_layer(layer)
            return self.logits(x)


def chunks(ids: list[int], max_context: int) -> list[list[int]]:
    """Calibration sequences of equal length (at most CHUNK and the context), up to MAX_TOKENS in all."""
    n = min(CHUNK, max_context)
    ids = ids[:MAX_TOKENS]
    return [ids[s:s + n] for s in range(0, len(ids) - n + 1, n)] or [ids]


def walk(dec, ids: list[int], on_unit: Callable, progress=None) -> None:
    """Run the calibration text through `dec` layer by layer; for every weight group (unit, e.g.
    "layers.3.qkv", and finally "lm_head") call `on_unit(unit, hessian, forward)` with H = X^T X / n
    of its input, before the group runs. `on_unit` quantizes the group and puts its dequantized
    weights into the run with `forward.set(...)`, so everything downstream sees them; for the last
    group nothing runs downstream, and `forward` is None.
    """
    import torch

    forward = DecoderForward(dec)
    seqs = torch.tensor(chunks(ids, dec.max_context))
    with torch.no_grad():
        x = forward.embed(seqs)
        for i, layer in enumerate(dec.layers):
            def observe(unit, inputs, i=i):
                flat = inputs.reshape(-1, inputs.shape[-1])
                on_unit(f"layers.{i}.{unit}", (flat.T @ flat / flat.shape[0]).numpy(), forward)
            x = forward.layer(layer, x, observe)
            forward.release_layer(layer)
            if progress:
                progress(i + 1)
        h = forward.norm(x, dec.final_norm)
        flat = h.reshape(-1, h.shape[-1])
        hessian = (flat.T @ flat / flat.shape[0]).numpy()
        del forward, x, h, flat  # nothing runs after the lm_head: its quantization has the memory
        on_unit("lm_head", hessian, None)

