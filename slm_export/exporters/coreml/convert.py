"""torch.export -> coremltools -> ML program (iOS 18 / macOS 15), quantized, saved as .mlpackage.

One function with a flexible query length (1..PREFILL_CHUNK, a `RangeDim`) serves both prefill
and decode, and the KV cache is Core ML state. Why one flexible function and not two fixed ones:
the state must be shared between prefill and decode, and one function does that by construction;
a range-shaped input runs on CPU and GPU, while the Neural Engine wants fixed shapes (a later
multifunction variant could add that; docs/targets.md "Core ML" and docs/limits.md say so).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Largest number of tokens one call takes; longer prompts go in chunks. Bounds the activations
# (attention scores are heads x chunk x max_context) and the logits output (chunk x vocab).
PREFILL_CHUNK = 128
INPUTS = ("input_ids", "position")
OUTPUT = "logits"
STATES = ("key_cache", "value_cache")
DEPLOYMENT_TARGET = "iOS18"  # also macOS 15: the first with stateful models and int4 blocks


def prefill_chunk(max_context: int) -> int:
    # At most half the context: torch.export specialises the graph when a call may fill the whole
    # cache (it guards q_len != max_context), and no real prompt chunk is the entire context.
    return max(1, min(PREFILL_CHUNK, max_context // 2))


def export_program(module, max_context: int):
    from torch.export import Dim, export

    chunk = prefill_chunk(max_context)
    q_len = Dim("q_len", min=1, max=chunk)
    example = (torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    with torch.no_grad():
        ep = export(module, example, dynamic_shapes=({1: q_len}, None), strict=False)
    # coremltools takes the ATEN dialect, where buffer writes are explicit mutations (-> states).
    return ep.run_decompositions({})


def convert(program, fp16: bool, keep_tied_table_shared: bool):
    """ExportedProgram -> in-memory mlprogram (weights still float)."""
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    if not keep_tied_table_shared:  # embedding and lm_head quantized differently: keep two consts
        pipeline.remove_passes(["common::const_deduplication"])
    dtype = np.float16 if fp16 else np.float32
    return ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        outputs=[ct.TensorType(name=OUTPUT, dtype=dtype)],
        pass_pipeline=pipeline,
        skip_model_load=True,  # nothing can load it on Linux; on macOS the runner compiles it when used
    )


def save(mlmodel, path: Path, metadata: dict) -> None:
    mlmodel.short_description = metadata.get("description", "")
    for k, v in metadata.items():
        mlmodel.user_defined_metadata[k] = str(v)
    mlmodel.save(str(path))
