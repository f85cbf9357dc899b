"""Plain-PyTorch building blocks shared by the exporters that trace a module of their own
(ExecuTorch, Core ML): a quantizer's codes as a torchao tensor, nn.Linear from a Decoder Linear, the
lm_head, the weight -> PyTorch-name table, rope as tables plus a rotate-half matrix, and an RMSNorm
that float16 cannot overflow.

Weights: a Decoder's arrays may be read from disk on demand (np.asarray reads one), so each is read
once, where its module is made. `copy=False` makes the module's float weights views of those arrays
(for a module whose weights nothing writes in place); a ready `weight` (a quantized tensor) replaces
the float one, which is then never read.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def float_tensor(array, copy: bool = True) -> torch.Tensor:
    """A Decoder array (or one read on demand) as a tensor: a copy, or a view of it with copy=False."""
    t = torch.from_numpy(np.asarray(array))
    return t.clone() if copy else t


def torchao_weight(qw, activations: str, embedding: bool = False,
                   dtype: torch.dtype = torch.float32, owned: bool = False) -> torch.Tensor:
    """The torchao tensor of `qw` ([out, in]) for a linear, or with embedding=True an embedding table.

    Symmetric int8 codes are taken as they are (a view, not a copy: nothing writes into them), or
    with owned=True copied into torch's own memory, which (unlike numpy's) can be freed in place."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActivationQuantization)

    out_f = qw.shape[0]
    scale = (torch.tensor(qw.scales) if owned else torch.from_numpy(qw.scales.copy())).to(dtype).reshape(out_f, -1)
    # torchao keeps codes in the signed range; asymmetric codes and zero points [0, 2**bits) shift
    # down by 2**(bits-1) together, which leaves (code - zero point) unchanged.
    if qw.symmetric and qw.codes.dtype == np.int8:
        codes = torch.tensor(qw.codes) if owned else torch.from_numpy(np.ascontiguousarray(qw.codes))
    else:
        shift = 0 if qw.symmetric else 1 << (qw.bits - 1)
        codes = torch.from_numpy(qw.codes.astype("int16") - shift).to(torch.int8)
    zero = torch.zeros(scale.shape, dtype=torch.int8) if qw.symmetric else \
        torch.from_numpy(qw.zero_points.astype("int16") - shift).to(torch.int8)
    act = ActivationQuantization.INT8_ASYM_PER_TOKEN if not embedding and activations == "int8" else None
    return IntxUnpackedToInt8Tensor(
        qdata=codes, scale=scale, zero_point=zero, target_dtype=torch.int4 if qw.bits == 4 else torch.int8,
        block_size=(1, qw.group), dtype=dtype, activation_quantization=act)


def float_weights(source: str, rows, embedding: bool = False) -> None:
    """The `weights(source, rows, embedding)` of a module built with every weight float (from the Decoder)."""
    return None


def _parameter(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def linear_module(lin, weight: torch.Tensor | None = None, copy: bool = True) -> nn.Linear:
    out_f, in_f = lin.weight.shape
    if weight is not None and tuple(weight.shape) != (out_f, in_f):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {lin.sources[0]} {(out_f, in_f)}")
    m = nn.Linear(in_f, out_f, bias=lin.bias is not None, device="meta")  # no float weight made to be replaced
    m.source = lin.sources[0]
    m.rows = lin.rows  # the rows of that source it holds (a part of Phi-3's fused qkv_proj), or None
    m.weight = _parameter(float_tensor(lin.weight, copy) if weight is None else weight)
    if lin.bias is not None:
        m.bias = _parameter(float_tensor(lin.bias, copy))
    return m


def embedding_module(dec, weight: torch.Tensor | None = None, copy: bool = True) -> nn.Embedding:
    """The token embedding (frozen), from `dec.embed` or a ready `weight` of its shape."""
    if weight is not None and tuple(weight.shape) != tuple(dec.embed.shape):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit the embedding {tuple(dec.embed.shape)}")
    m = nn.Embedding(dec.vocab_size, dec.hidden_size, device="meta")
    m.weight = _parameter(float_tensor(dec.embed, copy) if weight is None else weight)
    return m


class BiasApartLinear(nn.Linear):
    """x W^T, then + b as an op of its own: XNNPACK's int8 weight-only linear takes no bias
    (executorch 1.5.1's serializer wants a quantized input for one)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight) + self.bias


def split_biases(module: nn.Module) -> None:
    """Every nn.Linear with a bias in `module` computes its bias apart (same names, same weights)."""
    for mod in module.modules():
        if type(mod) is nn.Linear and mod.bias is not None:
            mod.__class__ = BiasApartLinear  # a subclass with no state of its own: only forward changes


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R with x @ R == cat(-x2, x1): Hugging Face's rotate-half as a matmul.

    Slicing a dynamic-length tensor splits an XNNPACK delegate; a small constant matmul does not.
    """
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def lm_head_module(dec, weight: torch.Tensor | None = None, copy: bool = True) -> nn.Linear:
    """A weight of its own even when tied: the embedding (a gather) and the lm_head (a matmul) may be
    quantized differently, each in the form its kernel reads fastest."""
    if weight is not None and tuple(weight.shape) != (dec.vocab_size, dec.hidden_size):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit the lm_head {(dec.vocab_size, dec.hidden_size)}")
    head = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False, device="meta")
    head.weight = _parameter(float_tensor(dec.lm_head, copy) if weight is None else weight)
    return head


def weight_sources(layers: nn.ModuleList) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Module name -> (the PyTorch parameter it was built from, the rows of it it holds or None)."""
    sources = {"embed_tokens": ("model.embed_tokens.weight", None), "lm_head": ("lm_head.weight", None)}
    for i, block in enumerate(layers):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) and hasattr(mod, "source"):
                sources[f"layers.{i}.{name}"] = (mod.source, mod.rows)
    return sources


def rope_tables(dec, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos/sin tables [max_context, head_dim] (each half repeated), so rope is two
    multiplies and one small matmul with `rotate_half_matrix`."""
    cos = torch.from_numpy(dec.rope_cos[:max_context])
    sin = torch.from_numpy(dec.rope_sin[:max_context])
    return torch.cat([cos, cos], -1).contiguous(), torch.cat([sin, sin], -1).contiguous()


def scaled_rms_norm(x, weight, eps: float, row_max, mean_of_squares):
    """x / rms(x) * weight, computed on x' = x / s with s = max|x| per row, for float16 programs.

    Small LMs carry huge activations in a few channels (SmolLM2-135M's residual stream reaches 2.4e4
    from layer 12 on), whose squares overflow float16 (max 65504). With x' in [-1, 1], mean(x'^2)
    lies in [1/hidden, 1] and rms(x) = s * sqrt(mean(x'^2) + eps / s^2): exact algebra, and no
    intermediate leaves float16's range. `row_max(|x|)` and `mean_of_squares(x'^2)` reduce over the
    last dimension in whatever form the target's compiler keeps whole (both keep the last dim as 1).
    """
    s = torch.clamp(row_max(x.abs()), min=1e-4)  # an all-zero row stays zero rather than 0/0
    xs = x / s
    # eps / s^2 as (sqrt(eps) / s)^2: a scalar over a tensor is its reciprocal times the scalar, and
    # 1 / s^2 overflows float16 for s < 4e-3 (1 / s stays finite down to the clamp).
    e = (eps ** 0.5) / s
    return xs * torch.rsqrt(mean_of_squares(xs * xs) + e * e) * weight
