"""The `executorch` target: a .pte with the XNNPACK delegate, torchao 8da4w/8da8w, KV cache inside.

The program is built from the neutral `Decoder` (module.py), quantized with one torchao config
(quant.py) and lowered with a lowering path tuned for speed (lower.py). ExecuTorch, torchao and
torch are imported only here, inside the methods, so the rest of the tool works without them.
"""
from __future__ import annotations

from pathlib import Path

from ...quantize import TargetLimits
from ...quiet import quiet_third_party
from .. import TARGETS, ExporterBase, ExportOptions, TargetOutput

MODEL_FILE = "model.pte"
KV_BUFFERS = ("k_cache", "v_cache", "k_scales", "v_scales", "k_zeros", "v_zeros")  # module.py's names


def require_sdk() -> None:
    from ...errors import SlmExportError

    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as e:
        raise SlmExportError(
            f"the executorch target needs the executorch and torchao packages ({e.name} is missing): "
            "pip install executorch==1.5.1 torchao==0.18.0 (with torch==2.13.0 installed first)") from None


def build_module(decoder, spec, plan, codes, max_context: int, kv_bits: int = 32, float16: bool = False,
                 owned: list | None = None):
    """The quantized PyTorch program that is exported: (module, QuantReport). Its quantized weights are
    torchao tensors made from `codes` as the module is built; its float ones views of the Decoder's.
    With a list `owned`: see quant.quantized_weights (`codes` keeps no values then)."""
    import torch

    from ..torch_parts import split_biases
    from .lower import chunk_for
    from .module import ExportableDecoder
    from .quant import quant_report, quantized_weights

    with torch.no_grad():
        weights = quantized_weights(plan, codes, spec, owned)
        module = ExportableDecoder(decoder, max_context, kv_bits, float16, chunk_for(max_context), weights).eval()
        if spec.quantized and any(w.quantized and plan.limits.activations_for(w.bits, spec) == "float"
                                  for w in plan.weights if w.kind == "linear"):
            split_biases(module)  # XNNPACK's weight-only linear takes no bias (weight_only.py)
    return module, quant_report(module, plan, codes, spec)


def single_use(module, tensors: list) -> list:
    """Those of `tensors` that one delegate alone reads: not the lm_head's, which both methods do."""
    shared = {t.untyped_storage().data_ptr() for t in module.read_by_both_methods()}
    return [t for t in tensors if t.untyped_storage().data_ptr() not in shared]


@TARGETS.register("executorch")
class ExecuTorchExporter(ExporterBase):
    name = "executorch"
    runtime = "executorch"
    packages = ("executorch", "torchao")
    kv_cache_bits = (32, 16, 8)
    # float16: the whole program in fp16 (weights, activations, KV cache), for --bits 16 only. Half
    # the file and memory of fp32; fast where the CPU computes in fp16 (ARMv8.2+ phones, the Pi 5).
    compute_precisions = ("float32", "float16")
    # The C++ runtime with XNNPACK (our runner measures ~15 MB of libraries; an app's own code aside).
    runtime_overhead_mb = 31.0
    # Export peak RSS (slm_export/memory.py), fitted on a 2-core AMD EPYC / 23.5 GiB Linux machine to
    # benchmarks/export_memory.py's measurements: a tiny model's export 497 MiB; SmolLM2-135M (513 MiB
    # of fp32 weights, the bundled GGUF) rtn int4 2683, rtn int8 2592, float 3370; the Qwen2.5-0.5B shape
    # (1884 MiB) float 10575. Estimates within 0..+5% of them; the default int8 (GPTQ, weight-only: 3298)
    # is 3% over its estimate, CALIBRATION_PEAK's.
    export_base_mb = 524.0
    export_peak = {4: 4.4, 8: 4.1, 16: 5.6}
    streams_weights = True
    # XNNPACK's serialized constants live until the file is written (each weight's codes are freed as
    # it is serialized, not the lm_head's: both methods read it): fitted at int4 to the Llama-3.2-1B
    # shape with the int4 default's int8 lm_head (3.33 GB measured: 0.185; with an int4 lm_head 0.138,
    # and 0.122 at the -3B shape: benchmarks/STREAMING_EXPORT.md); int8 scaled by what it stores; float,
    # whose weights are the Decoder's, as before
    stream_write = {4: 0.19, 8: 0.28, 16: 3.2}

    # At --bits 4, as on ONNX: an int8 lm_head and a quarter more size spent on the most sensitive
    # units at int8, both on float activations here (limits: finer_weights_float_activations). All-int4
    # is far less faithful here than on ONNX, mostly from the int4 codes themselves, not the
    # activations' per-token rounding (docs/quantization.md "Defaults").
    default_lm_head_bits = 8
    default_mixed_precision = 0.25

    def kv_bits_for(self, compute_precision: str) -> tuple[int, ...]:
        return (16,) if compute_precision == "float16" else self.kv_cache_bits

    def embedding_bits_for(self, bits: int) -> int:
        # A tied table is stored twice here: as rows for the embedding lookup and, packed inside
        # XNNPACK's opaque blob, as the lm_head. At --bits 4, int4 rows (groups of 32) make the
        # SmolLM2-135M .pte 94.9 MB instead of 105.7 (perplexity 39.97 instead of 39.67, same speed and
        # memory), as ExecuTorch's own LLM export recommends for large vocabularies (--embedding-quantize 4,32).
        return 4 if bits == 4 else 8

    def limits(self, compute_precision: str | None = None) -> TargetLimits:
        # XNNPACK: int4 in groups that are multiples of 32 (a width none divides: int8 per channel),
        # group scales kept as bfloat16, int8 one scale per output channel, no zero points for linears
        # (its weight formats have no field for them), int8 activations per token; float activations
        # take int8 per-channel weights only (weight_only.py), and so do int8 linears in an int4 program
        # (less KL than as 8da8w: docs/quantization.md "Defaults"). ExecuTorch's quantized embedding ops:
        # int8 rows or int4 groups with float32 scales. A tied table is stored twice (rows + lm_head).
        return TargetLimits("executorch", min_group=32, indivisible="int8", int8_per_channel=True,
                            zero_points=False, signed_scales=False, scale_dtype={4: "bfloat16", 8: "float32"},
                            embedding_bits=(8, 4), embedding_min_group=16, tied_table="separate",
                            activation_rounding="per-token", weight_only_bits=(8,),
                            finer_weights_float_activations=True,
                            float_bytes=2 if compute_precision == "float16" else 4)


    def default_activations(self, bits: int) -> str:
        # int8 weights with float activations (XNNPACK's qc8w GEMM) rather than 8da8w: on SmolLM2-135M mean
        # KL 0.0027 against 0.019 (per-token activation rounding), and no slower (benchmarks/quality.py)
        return "float" if bits == 8 else "int8"

    def kv_element_bytes(self, kv_bits: int, head_dim: int) -> float:
        # int8 rows carry an fp32 scale and an int8 zero point each (custom_quantized_sdpa's layout)
        return 1 + 5 / head_dim if kv_bits == 8 else super().kv_element_bytes(kv_bits, head_dim)


    def check(self, spec, compute_precision: str) -> None:
        from ...errors import SlmExportError

        if spec.palettize:
            raise SlmExportError("--palettize is a Core ML option (--target coreml); ExecuTorch stores int4/int8 with scales")
        if compute_precision == "float16" and spec.quantized:
            raise SlmExportError(
                f"--compute-precision float16 is for --bits 16 on the executorch target (fp16 weights); --bits {spec.bits} "
                "runs int8 dynamic activations with fp32 in between: drop --compute-precision, or use --bits 16")
        self.limits(compute_precision).check(spec)
        require_sdk()

    def write(self, decoder, spec, out_dir: Path, options: ExportOptions, plan, codes) -> TargetOutput:
        quiet_third_party()
        require_sdk()
        from .contract import FORWARD, LOGITS, kernel_libraries, own_kernels, runner_metadata
        from .handoff import CPP_EXAMPLE, write_cpp_example
        from .lower import chunk_for, export_program, write_pte

        float16 = options.compute_precision == "float16"
        chunk = chunk_for(options.max_context)
        owned = []  # the quantized weights in torch's memory, freed as they are serialized
        module, report = build_module(decoder, spec, plan, codes, options.max_context, options.kv_bits, float16, owned)
        metadata = runner_metadata(decoder, options, chunk, sdpa=any(not b.attn.explicit for b in module.layers))
        codes.clear()  # the module holds them now: once lowered, nothing does (release_weights)
        program = export_program(module, options.max_context, metadata=metadata, release_weights=True,
                                 freeable=single_use(module, owned))
        write_pte(program, Path(out_dir) / MODEL_FILE)
        write_cpp_example(Path(out_dir), chunk, options.max_context)
        int8_kv = options.kv_bits == 8
        # Read off the module: layers with explicit attention (Gemma-2) keep an fp32 cache whatever --kv-bits says.
        kv_buffers = [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in KV_BUFFERS]
        kv_bytes = sum(b.numel() * b.element_size() for b in kv_buffers)
        kv_dtypes = sorted({str(b.dtype).removeprefix("torch.") for name, b in module.named_buffers()
                            if name.endswith(("k_cache", "v_cache"))})
        vocab = decoder.vocab_size
        io = {
            "methods": {
                FORWARD: {
                    "inputs": {
                        "tokens": {"dtype": "int64", "shape": [1, f"n <= {chunk}"],
                                   "note": "new tokens; feed a longer prompt in chunks of at most this many"},
                        "input_pos": {"dtype": "int64", "shape": [1], "note": "cache position of tokens[0] (tokens so far)"},
                    },
                    "outputs": {"logits": {"dtype": "float32", "shape": [1, vocab], "note": "the last token's"}},
                },
                LOGITS: {
                    "inputs": {"rows": {"dtype": "int64", "shape": ["k <= n"],
                                        "note": "rows of the tokens the last forward call appended: 0..n-1 for all"}},
                    "outputs": {"logits": {"dtype": "float32", "shape": ["k", vocab]}},
                },
            },
            # ExecuTorch's LLM runner contract (contract.py): forward as above and these constant methods
            "runner_metadata": metadata,
            "prefill_chunk": chunk,
            "kv_layout": {"layers": decoder.num_layers, "kv_heads": decoder.num_kv_heads, "head_dim": decoder.head_dim,
                          "dtype": " + ".join(kv_dtypes) + (" rows with an fp32 scale and int8 zero point each"
                                                            if int8_kv else ""),
                          "in_program": True, "bytes": kv_bytes,
                          "note": "mutable buffers inside the program, sized for max_context and shared by its "
                                  "methods; a new conversation just starts again at input_pos 0"},
        }
        # Read off the program: what an app's runtime must register beyond ExecuTorch's core kernels.
        operators = {op.name for plan in program.executorch_program.execution_plan for op in plan.operators}
        custom_ops = sorted(name for name in operators if name.startswith(("llama::", "slm::")))
        extra = {"delegate": "XnnpackBackend", "custom_ops": custom_ops,
                 "quantized_ops": (["quantized_decomposed::embedding_byte / embedding_4bit"] if spec.quantized else []) +
                                  (["quantized_decomposed::choose_qparams_per_token_asymmetric / quantize_per_token"]
                                   if int8_kv else []),
                 # what an app links beside the XNNPACK backend; "from": "slm-export" is not in ExecuTorch's builds
                 "kernels": kernel_libraries(operators),
                 "own_kernels": own_kernels(operators),
                 "kv_bits": options.kv_bits, "compute_precision": "float16" if float16 else "float32",
                 "cpp_example": CPP_EXAMPLE}
        # The torch-free C++ runner implements custom_sdpa and our slm:: ops, not ExecuTorch's int8-cache
        # attention, whose kernel ships only linked to libtorch: those files run in the Python bindings.
        return TargetOutput(MODEL_FILE, io, report, extra, runtime="executorch-pybind" if int8_kv else None)

    def same_quant_weights(self, model, folder: Path, manifest: dict) -> dict:
        # The recorded plan quantized again from `model` by the same quantizer; verify's weight check
        # (package_checks) reads the .pte's codes and scales back and requires exactly these.
        # With awq the norms were rescaled too: those of the model as exported.
        from ...quantize.awq import rescaled_norms
        from ...quantize.replay import requantize
        from .quant import dequantized_weights

        plan, codes, dec = requantize(self, model, folder, manifest)
        return dequantized_weights(plan, codes) | (rescaled_norms(dec) if plan.equalizes else {})

    def package_checks(self, folder: Path, manifest: dict, model=None) -> list[dict]:
        """The .pte's weights read back and compared with the re-quantized reference, exactly (checks.py)."""
        from .checks import check_weights

        return [check_weights(Path(folder), manifest, model)]

    def app_readme(self, manifest: dict) -> str:
        from .handoff import app_readme

        return app_readme(manifest)
