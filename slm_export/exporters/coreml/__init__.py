"""The `coreml` target: a stateful .mlpackage (ML program, iOS 18 / macOS 15) with int8/int4 weights.

Built from the neutral `Decoder` as a PyTorch program (module.py), exported with torch.export,
converted by coremltools (convert.py), and the quantizer's codes packed into it as constexpr ops (quant.py).
Linux cannot execute Core ML, so `verify` checks there what can be checked (checks.py): the
package's spec against the manifest, its weights read back and compared with an independent
quantization, and the converted PyTorch program against the original model.
"""
from __future__ import annotations

import math
from pathlib import Path

from ...quantize import TargetLimits
from .. import TARGETS, ExporterBase, ExportOptions, TargetOutput

MODEL_FILE = "model.mlpackage"
SWIFT_FILE = "SlmExportExample.swift"
MODEL_NAME_KEY = "co.huggingface.exporters.name"  # user-defined metadata swift-transformers reads


def require_sdk() -> None:
    from ...errors import SlmExportError

    try:
        import coremltools  # noqa: F401
        import torchao  # noqa: F401  (quantized weights enter the program as torchao's dequantize_affine)
    except ImportError as e:
        raise SlmExportError(f"the coreml target needs coremltools and torchao ({e.name} is missing): "
                             "pip install coremltools==9.0 torchao==0.18.0") from None


# coremltools draws a tqdm bar per conversion stage and pass; our log says what happens instead.
COREMLTOOLS_BARS = [("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
                    ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
                    ("coremltools.optimize.coreml._quantization_passes", "tqdm")]


def build_module(decoder, max_context: int, weights=None):
    """CoreMLDecoder with float copies of the Decoder's weights, or the quantized tensors `weights` gives
    (quant.module_weights)."""
    import torch

    from .module import CoreMLDecoder

    with torch.no_grad():
        return CoreMLDecoder(decoder, max_context, weights).eval()


@TARGETS.register("coreml")
class CoreMLExporter(ExporterBase):
    name = "coreml"
    runtime = "coreml"
    packages = ("coremltools",)
    compute_precisions = ("float16", "float32")  # the first is the default
    quantizes_activations = False  # Core ML quantizes weights; activations stay float
    kv_cache_bits = (16,)  # Core ML state is float16 (module.py): what fit counts and says
    kv_bytes = 2  # float16 state
    # Export peak RSS (slm_export/memory.py) of a model in memory, fitted on a 2-core AMD EPYC / 23.5 GiB
    # Linux machine: a tiny model's export 576 MiB; SmolLM2-135M (513 MiB of fp32 weights) loaded whole and
    # exported with rtn, int4 2166 MiB, int8 2132 (2026-12-07); float16 3544. A palettized export converts
    # float weights and palettizes them after conversion: `palette_peak` (the float-program path measured
    # 4114 / 4126 MiB at int4 / int8 when linear quantization also ran after conversion).
    export_base_mb = 608.0
    export_peak = {4: 3.1, 8: 3.05, 16: 5.8}
    palette_peak = {4: 6.9, 8: 6.95}
    # Streaming a quantized export (`streams`), beyond the quantizer's codes: the program's copy of the
    # codes (coremltools' int4/int8 arrays). Fitted to benchmarks/streaming_export.py's rtn exports on the
    # 2-core AMD EPYC above: Llama-3.2-1B shape int4 3.84 GB, int8 3.51 GB; Llama-3.2-3B shape int4 8.84 GB.
    stream_write = {4: 0.32, 8: 0.25, 16: 1.0}

    def limits(self, compute_precision: str | None = None) -> TargetLimits:
        # constexpr_blockwise_shift_scale (iOS 18): int4 blocks along `in` (any block that divides;
        # a width no power of two >= 16 divides is stored int8 per channel), int8 per channel, offsets
        # for asymmetric weights, scales in the program's precision. Weights only: activations stay float.
        scales = compute_precision or self.compute_precisions[0]
        return TargetLimits("coreml", min_group=16, indivisible="int8", int8_per_channel=True, zero_points=True,
                            signed_scales=False, scale_dtype={4: scales, 8: scales}, embedding_bits=(8, 4),
                            embedding_min_group=16, embedding_scale_dtype=scales, tied_table="shared",
                            activation_rounding="none", float_bytes=2 if scales == "float16" else 4,
                            rescaled_norms=False)


    def check(self, spec, compute_precision: str) -> None:
        self.limits(compute_precision).check(spec)
        require_sdk()

    def peak_per_fp32_byte(self, spec) -> float:
        return self.palette_peak[spec.bits] if spec.palettize else super().peak_per_fp32_byte(spec)

    def streams(self, spec) -> bool:
        # Quantized weights go into the program as their codes (quant.module_weights), never float; a
        # float or palettized export converts float weights (coremltools' k-means palettizes those).
        return spec.quantized and not spec.palettize

    def write(self, decoder, spec, out_dir: Path, options: ExportOptions, plan, codes) -> TargetOutput:
        from ...quiet import no_progress_bars, quiet_third_party
        from . import convert, quant
        from .handoff import swift_example

        quiet_third_party()
        require_sdk()
        fp16 = (options.compute_precision or self.compute_precisions[0]) == "float16"
        codes_in_program = self.streams(spec)  # else a float program (--bits 16, or palettized after conversion)
        module = build_module(decoder, options.max_context, quant.module_weights(plan, codes) if codes_in_program else None)
        tied = decoder.tied_embeddings
        packed, report = quant.packs(module, plan, codes, fp16, tied, spec.palettize)
        owners = quant.weight_owners(module) if codes_in_program else None  # before torch.export renames shared ones
        program = convert.export_program(module, options.max_context)
        if owners is not None:
            quant.name_weight_ops(program, owners)
        with no_progress_bars(COREMLTOOLS_BARS):
            mlmodel = convert.convert(program, fp16, keep_tied_table_shared=tied)
            mlmodel = quant.apply(mlmodel, packed)
        io = describe_io(decoder, options.max_context, fp16)
        convert.save(mlmodel, Path(out_dir) / MODEL_FILE, {
            "description": f"slm-export {decoder.architecture} decoder, {spec.label()}, KV cache as state",
            # swift-transformers' LanguageModel.modelName (its Hub id for config and tokenizer, when no
            # tokenizer is passed in; otherwise a label)
            MODEL_NAME_KEY: options.model_name,
            "slm_export.io": io_summary(io)})
        (Path(out_dir) / SWIFT_FILE).write_text(swift_example(io, options.eos_token_ids))
        extra = {"compute_precision": "float16" if fp16 else "float32",
                 "minimum_deployment_target": "iOS 18 / macOS 15",
                 "activations": "float16" if fp16 else "float32",
                 "swift_example": SWIFT_FILE,
                 "execution": "needs macOS 15+ or iOS 18+ (Core ML); on Linux `verify` checks the package instead"}
        return TargetOutput(MODEL_FILE, io, report, extra)

    def same_quant_weights(self, model, folder: Path, manifest: dict) -> dict:
        from .checks import package_weights_by_source

        return package_weights_by_source(Path(folder), manifest)

    def app_readme(self, manifest: dict) -> str:
        from .handoff import app_readme

        return app_readme(manifest)

    def stand_in_runner(self, model, folder: Path, manifest: dict, threads=None):
        """Where Core ML cannot run: the converted PyTorch program carrying the package's weights."""
        from .checks import ProgramRunner

        return ProgramRunner(model, Path(folder), manifest, threads)

    def package_checks(self, folder: Path, manifest: dict, model=None) -> list[dict]:
        from .checks import run_package_checks

        return run_package_checks(Path(folder), manifest, model)


def describe_io(decoder, max_context: int, fp16: bool) -> dict:
    from .convert import INPUTS, OUTPUT, STATES, prefill_chunk

    chunk = prefill_chunk(max_context)
    cache = [decoder.num_layers, decoder.num_kv_heads, max_context, decoder.head_dim]
    kv_bytes = 2 * math.prod(cache) * 2  # keys and values, float16
    ids, mask = INPUTS
    return {
        "functions": {"main": {
            "inputs": {
                ids: {"dtype": "int32", "shape": [1, f"1..{chunk}"],
                      "note": "the new tokens: a whole prompt (or a chunk of it), then one token per call"},
                mask: {"dtype": "float16", "shape": [1, 1, f"1..{chunk}", f"1..{max_context}"],
                       "note": f"only its shape is read: its last dimension is the number of tokens in the cache "
                               f"after this call (the new tokens go to the slots from that minus {ids}' length); "
                               "its values are not read, the model masks causally itself"},
            },
            "outputs": {OUTPUT: {"dtype": "float16" if fp16 else "float32", "shape": [1, "q", decoder.vocab_size]}},
            "states": {s: {"dtype": "float16", "shape": cache} for s in STATES},
        }},
        "prefill_chunk": chunk,
        "query_length": "flexible (RangeDim 1..prefill_chunk): one function for prefill and decode",
        "kv_layout": {"layers": decoder.num_layers, "kv_heads": decoder.num_kv_heads, "head_dim": decoder.head_dim,
                      "dtype": "float16", "in_program": True, "bytes": kv_bytes,
                      "order": "layers, kv_heads, max_context, head_dim",
                      "note": "Core ML state from model.makeState(); a new conversation gets a new state"},
    }


def io_summary(io: dict) -> str:
    f = io["functions"]["main"]
    return "; ".join([", ".join(f"{k}:{v['dtype']}{v['shape']}" for k, v in f["inputs"].items()),
                      ", ".join(f"{k}:{v['dtype']}" for k, v in f["outputs"].items()),
                      ", ".join(f"state {k}:{v['shape']}" for k, v in f["states"].items())])
