"""Packing the quantizer's codes into the PyTorch program as torchao tensors, for XNNPACK.

Each quantized weight becomes a torchao `IntxUnpackedToInt8Tensor` built straight from the given codes
(int8 values, scales [out, groups], block (1, group)), as ExecuTorch's own LLM export does for
pre-quantized checkpoints; nothing is re-rounded here, and the module is built with these tensors in
place (module.py), so no float copy of a quantized weight is ever made. Linears with int8 activations carry torchao's
per-token dynamic activation quantization (8da4w / 8da8w: XNNPACK's fastest CPU kernels); embeddings,
--weight-only linears and int8 linears in an int4 program (`TargetLimits.activations_for`) carry none
(weight_only.py). The lowering turns them into XNNPACK's
qd8-f32-qb4w / qc8w GEMMs and ExecuTorch's quantized embedding ops.

What the format keeps, declared in `ExecuTorchExporter.limits`: XNNPACK stores int4 group scales as
bfloat16 (so the quantizer chooses codes against bf16 scales) and no zero points for linears;
int8 per-channel and embedding scales stay float32.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from ...quantize import QuantizedWeight, QuantReport, WeightEntry
from ...quantize.plan import EMBEDDING, LM_HEAD
from ..torch_parts import torchao_weight


def pack_weight(module: nn.Module, qw: QuantizedWeight, activations: str) -> None:
    """Replace `module.weight` (nn.Linear or nn.Embedding, [out, in]) by the torchao tensor of `qw`."""
    w = module.weight
    if qw.shape != tuple(w.shape):
        raise ValueError(f"codes {qw.shape} do not fit weight {tuple(w.shape)}")
    module.weight = nn.Parameter(torchao_weight(qw, activations, isinstance(module, nn.Embedding), w.dtype),
                                 requires_grad=False)


def quantized_weights(plan, codes: dict[str, QuantizedWeight], spec, owned: list | None = None):
    """`weight(source, rows, embedding)`: the torchao tensor of a planned weight (the `rows` of it, if
    given), or None for one kept float; what ExportableDecoder builds its quantized modules with.

    With a list `owned`, a whole weight's codes and scales move into tensors of torch's own memory
    (listed there), one weight at a time: `codes[source]` keeps its shape, bits and group, not its
    values. The lowering can then free each one as soon as XNNPACK has serialized it
    (edge_passes.delegated_weights_freed); numpy's memory cannot be freed while torch views it."""
    def weight(source: str, rows: tuple[int, int] | None, embedding: bool = False):
        if not plan[source].quantized:
            return None
        if rows is not None or owned is None or not codes[source].symmetric or codes[source].codes.dtype != np.int8:
            qw = codes[source] if rows is None else codes[source].rows(*rows)
            return torchao_weight(qw, plan.limits.activations_for(qw.bits, spec), embedding)
        qw = codes[source]
        if qw.codes.strides == (0,) * qw.codes.ndim:  # moved already: one storage for two modules cannot be freed
            raise ValueError(f"the codes of {source} were moved into torch's memory for another module")
        tensor = torchao_weight(qw, plan.limits.activations_for(qw.bits, spec), embedding, owned=True)
        codes[source] = QuantizedWeight(_no_values(qw.codes), _no_values(qw.scales), None, qw.bits, qw.group)
        owned.extend([tensor.qdata, tensor.scale, tensor.zero_point])
        return tensor
    return weight


def _no_values(a: np.ndarray) -> np.ndarray:
    """An array of `a`'s shape and dtype that holds no memory (every element is one zero)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, a.dtype), a.shape, (0,) * a.ndim, writeable=False)


def quant_report(module, plan, codes: dict[str, QuantizedWeight], spec) -> QuantReport:
    """The per-weight report of `module` (an ExportableDecoder built with `quantized_weights`)."""
    report = QuantReport()
    for fqn, (source, rows) in module.sources.items():
        mod = module.get_submodule(fqn)
        w = mod.weight
        out_f, in_f = w.shape
        p = plan[source]
        embedding = isinstance(mod, nn.Embedding)
        float_bytes = w.numel() * 4
        if not p.quantized:
            kind = "Embedding" if embedding else "Linear"
            dtype = str(w.dtype).removeprefix("torch.")  # float16 in an fp16 program
            report.add(WeightEntry(fqn, [source], [out_f, in_f], f"{dtype} {kind}", None, None,
                                   float_bytes, w.numel() * w.element_size(), p.reason))
            continue
        qw = codes[source] if rows is None else codes[source].rows(*rows)
        where = f"group={qw.group}" if qw.group != in_f else "per-row" if embedding else "per-channel"
        acts = plan.limits.activations_for(qw.bits, spec)
        op = "Embedding" if embedding else "weight-only" if acts == "float" else f"8da{qw.bits}w"
        scheme = f"int{qw.bits} {where} {'sym' if qw.symmetric else 'asym'} {op} {p.method}"
        report.add(WeightEntry(fqn, [source], [out_f, in_f], scheme, qw.bits, None if qw.group == in_f else qw.group,
                               float_bytes, plan.stored_bytes(p) * out_f // p.shape[0], p.reason))
    return report


def dequantized_weights(plan, codes: dict[str, QuantizedWeight]) -> dict:
    """The float weights the program computes with, by PyTorch parameter name (a tied table that is
    stored once counts for both names)."""
    out = {name: qw.dequantize() for name, qw in codes.items()}
    for w in plan.weights:
        if w.shares and w.shares in out:
            out[w.name] = out[w.shares]
    return out


__all__ = ["torchao_weight", "pack_weight", "quantized_weights", "quant_report", "dequantized_weights", "EMBEDDING", "LM_HEAD"]
