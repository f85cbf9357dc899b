"""The quant spec mapped to torchao for ExecuTorch: one FqnToConfig, applied once with `quantize_`.

Linear weights: int4 or int8 with int8 dynamic activations (8da4w / 8da8w: XNNPACK's fastest CPU
kernels), int4 per group of `group_size` and int8 per output channel; or, with --weight-only, int8
per output channel with fp32 activations (weight_only.py). Embedding: int8 per row or
int4 per group (the quantized-embedding op ExecuTorch fuses at `to_executorch`). The lm_head, tied
or not, is a linear like the others. torchao's own LLM recipes skip a linear whose width does not
divide by the group size (it silently stays fp32); here the group falls back to the largest power
of two >= 32 that divides (XNNPACK's int4 kernels need multiples of 32), else to int8 per channel,
and the report says so.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ...quantize import QuantReport, QuantSpec, WeightEntry
from ...quantize.spec import block_size_for

XNNPACK_MIN_GROUP = 32


def _configs(bits: int, group: int | None, activations: str, symmetric: bool, embedding: bool):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    granularity = PerAxis(0) if group is None else PerGroup(group)
    dtype = torch.int4 if bits == 4 else torch.int8
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    # Symmetric int4 scales by HQQ's scale search, not torchao's default max/7.5 (which clips each
    # group's largest weight): measured relative weight error on SmolLM2 q_proj 0.102 vs 0.112
    # (onnxruntime's quantizer: 0.099), perplexity much closer to the ONNX int4 (see README).
    algorithm = "hqq_scale_only" if bits == 4 and symmetric else "affine"
    if embedding or activations == "float":
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, mapping_type=mapping,
                                    intx_choose_qparams_algorithm=algorithm)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                 weight_mapping_type=mapping, intx_choose_qparams_algorithm=algorithm)


def _plan(module, spec: QuantSpec):
    """(fqn -> torchao config, report entries) for every weight of the exportable module."""
    configs: OrderedDict = OrderedDict()
    report = QuantReport()
    for fqn, source in module.sources.items():
        mod = module.get_submodule(fqn)
        w = mod.weight
        out_f, in_f = w.shape
        plan = spec.plan_for(source)
        embedding = isinstance(mod, nn.Embedding)
        float_bytes = w.numel() * 4
        if plan.bits is None:
            kind = "Embedding" if embedding else "Linear"
            dtype = str(w.dtype).removeprefix("torch.")  # float16 in an fp16 program
            report.add(WeightEntry(fqn, [source], [out_f, in_f], f"{dtype} {kind}", None, None,
                                   float_bytes, w.numel() * w.element_size(), plan.reason))
            continue
        reason, bits = plan.reason, plan.bits
        group = None
        if bits == 4:
            # XNNPACK's int4 kernels take groups that are multiples of 32 (the quantized embedding
            # kernel takes any group that divides the row).
            group, note = block_size_for(in_f, plan.group_size, minimum=16 if embedding else XNNPACK_MIN_GROUP)
            if in_f % group:  # no power-of-two group >= the minimum divides: int8 per channel, said so
                bits, group = 8, None
                note = (f"in-features {in_f} not divisible by {XNNPACK_MIN_GROUP} (XNNPACK's smallest int4 group): "
                        "stored int8 per-channel instead")
            reason = f"{reason}; {note}" if note else reason
        if bits == 8:
            scheme = ("int8 per-row Embedding" if embedding else "int8 per-channel weight-only"
                      if spec.activations == "float" else "int8 per-channel 8da8w")
        else:
            scheme = (f"int4 group={group} {'sym HQQ-scale' if plan.symmetric else 'asym'} "
                      f"{'Embedding' if embedding else '8da4w'}")
        configs[fqn] = _configs(bits, group, spec.activations, plan.symmetric, embedding)
        n_scales = out_f * (1 if group is None else in_f // group)
        # Counts every scale as 4 bytes (torchao's fp32); the .pte is somewhat smaller than this sum
        # because XNNPACK serializes scales more compactly. The file size is measured, in the manifest.
        stored = w.numel() * bits // 8 + n_scales * 4 * (1 if plan.symmetric else 2)
        report.add(WeightEntry(fqn, [source], [out_f, in_f], scheme, bits, group, float_bytes, stored, reason))
    return configs, report


def quantize_module(module, spec: QuantSpec) -> QuantReport:
    """Quantize `module` (an ExportableDecoder) in place per `spec`; returns the per-weight report."""
    configs, report = _plan(module, spec)
    if configs:
        from torchao.quantization import FqnToConfig, quantize_

        quantize_(module, FqnToConfig(fqn_to_config=configs), filter_fn=None)
    return report


def dequantized_weights(module) -> dict:
    """The float weights a quantized ExportableDecoder computes with, by PyTorch parameter name.

    Parts that were split out of one fused parameter (Phi-3's qkv_proj, gate_up_proj) are joined
    again in their original order.
    """
    import numpy as np

    parts: dict[str, list] = {}
    for fqn, source in module.sources.items():
        w = module.get_submodule(fqn).weight
        if hasattr(w, "dequantize"):
            parts.setdefault(source, []).append(w.dequantize().detach().float().numpy())
    return {name: np.concatenate(ws) if len(ws) > 1 else ws[0] for name, ws in parts.items()}
