"""torch.export -> coremltools -> ML program (iOS 18 / macOS 15), quantized, saved as .mlpackage.

One function with a flexible query length (`RangeDim`s) serves both prefill and decode, and the KV
cache is Core ML state. Why one flexible function and not two fixed ones: the state must be shared
between prefill and decode, and one function does that by construction; it is also what
swift-transformers runs (a whole prompt in one call, then one token per call, and its context length
read from the upper bound of `inputIds`' range). A range-shaped input runs on CPU and GPU, while the
Neural Engine wants fixed shapes (a later multifunction variant could add that; docs/targets.md
"Core ML" and docs/limits.md say so). The feature names are module.py's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .module import INPUTS, OUTPUT, STATES  # noqa: F401 (the names, for the exporter and the checks)

DEPLOYMENT_TARGET = "iOS18"  # also macOS 15: the first with stateful models and int4 blocks


def prefill_chunk(max_context: int) -> int:
    """The most tokens one call takes: all but one of the context, so a prompt goes in one call (as
    swift-transformers sends it, its mask one wider than the tokens) and the range's upper bound is
    the context length it reads. (Not all of it: torch.export then specialises the graph, guarding
    q_len != max_context.)"""
    return max(2, max_context - 1)


def export_program(module, max_context: int):
    from torch.export import Dim, export

    q_len = Dim("q_len", min=1, max=prefill_chunk(max_context))
    mask_rows = Dim("mask_rows", min=1, max=prefill_chunk(max_context))  # swift-transformers sends 1
    end = Dim("end", min=1, max=max_context)
    example = (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 3, dtype=torch.float16))
    with torch.no_grad():
        ep = export(module, example, dynamic_shapes=({1: q_len}, {2: mask_rows, 3: end}), strict=False)
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
    """Name the inputs (torch.export lower-cases the argument names it traces: `inputids`), set the
    metadata, save."""
    import coremltools as ct

    spec = mlmodel.get_spec()
    traced = [f.name for f in spec.description.input]
    if len(traced) != len(INPUTS):
        raise RuntimeError(f"the converted program has inputs {traced}, expected {list(INPUTS)}")
    for old, new in zip(traced, INPUTS):  # in forward's order
        if old != new:
            ct.utils.rename_feature(spec, old, new, rename_outputs=False)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    mlmodel.short_description = metadata.get("description", "")
    for k, v in metadata.items():
        if k != "description":
            mlmodel.user_defined_metadata[k] = str(v)
    mlmodel.save(str(path))
