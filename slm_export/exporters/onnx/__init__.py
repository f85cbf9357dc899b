"""The `onnx` target: a hand-built decoder graph with onnxruntime's fused CPU kernels."""
from __future__ import annotations

from pathlib import Path

from ...quantize import TargetLimits
from .. import TARGETS, ExporterBase, ExportOptions, TargetOutput

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@TARGETS.register("onnx")
class OnnxExporter(ExporterBase):
    name = "onnx"
    runtime = "onnxruntime"
    packages = ("onnx", "onnxruntime")  # versions recorded in the manifest
    # 8: GroupQueryAttention's int8 cache with calibrated per-channel scales (kv_cache.py)
    kv_cache_bits = (32, 8)
    runtime_overhead_mb = 55.0  # measured here: the runner process with onnxruntime loaded, before the model
    # Export peak RSS (slm_export/memory.py), fitted on a 2-core AMD EPYC / 23.5 GiB Linux machine to
    # benchmarks/export_memory.py's measurements: a tiny model's export 439 MiB; SmolLM2-135M (513 MiB
    # of fp32 weights, the bundled GGUF) rtn int4 2023, rtn int8 2207, float 3376; the Qwen2.5-0.5B
    # shape (1884 MiB) float 11490. Estimates within 0..+3% of them.
    export_base_mb = 461.0
    export_peak = {4: 3.1, 8: 3.5, 16: 5.9}
    streams_weights = True
    # initializers go to the data file as the graph is built, and each weight's codes are dropped once packed
    stream_write = {4: 0.0, 8: 0.0, 16: 0.0}

    def limits(self, compute_precision: str | None = None) -> TargetLimits:
        # MatMulNBits: int4/int8 in blocks (a power of two >= 16; a width none divides is zero-padded),
        # float32 scales, optional zero points; activations to int8 per block of the weight's group (accuracy_level 4).
        # Embedding: int8 rows (Gather), or, tied and quantized like the lm_head, GatherBlockQuantized
        # straight out of the lm_head's codes (with a reshaped copy of its scales).
        return TargetLimits("onnx", min_group=16, indivisible="pad", int8_per_channel=False, zero_points=True,
                            embedding_bits=(8,), embedding_zero_points=False, tied_table="shared-if-alike",
                            shared_table_copies_scales=True,
                            activation_rounding="per-block",
                            # onnxruntime's GroupQueryAttention refuses other head sizes when it runs
                            # ("head_size shall be a multiple of 16"); ExecuTorch's custom_sdpa takes any
                            head_dim_multiple=16, attention_kernel="onnxruntime's GroupQueryAttention")


    # int4 defaults: an int8 lm_head (a tied embedding then gathers its rows from it, so the file is
    # smaller than with int4 lm_head + int8 embedding rows) and 25% more size for int8 on the most
    # sensitive weights; chosen from benchmarks/quality.py (docs/quantization.md, "Defaults").
    default_lm_head_bits = 8
    default_mixed_precision = 0.25

    def default_method(self, bits: int, symmetric: bool) -> str:
        # int8: the error is MatMulNBits' int8 activations, which awq's rescaling moves into the weights
        # (half gptq's KL at the same size and speed: docs/quantization.md); int4: gptq (the least KL)
        return "awq" if bits == 8 else "gptq"

    def calibrates(self, kv_bits: int) -> bool:
        return kv_bits == 8

    def check(self, spec, compute_precision: str) -> None:
        from ...errors import SlmExportError

        if spec.palettize:
            raise SlmExportError("--palettize is a Core ML option (--target coreml); ONNX stores int4/int8 with scales")
        self.limits(compute_precision).check(spec)

    def write(self, decoder, spec, out_dir: Path, options: ExportOptions, plan, codes) -> TargetOutput:
        import onnx

        from .graph import LOGITS_TO_KEEP_DEFAULT, build_decoder_graph

        path = Path(out_dir) / MODEL_FILE
        # the weights go to DATA_FILE as the graph is built: the graph never holds them all
        model, report = build_decoder_graph(decoder, spec, plan, codes, Path(out_dir) / DATA_FILE)
        onnx.save_model(model, str(path))
        kv = [decoder.num_kv_heads, decoder.head_dim]
        kv_dtype, extra = "float32", {"data_file": DATA_FILE, "opset": 23, "kv_bits": options.kv_bits}
        if options.kv_bits == 8:
            # The scales come from the saved fp32-cache graph running the calibration text; then the
            # graph is rewritten with an int8 cache. `model` refers to its weights in DATA_FILE, so only
            # model.onnx, with the small scales, is written again.
            from .kv_cache import CALIBRATION_TOKENS, MARGIN, calibration_scales, use_int8_cache

            ids, text = options.calibration(min(CALIBRATION_TOKENS, options.max_context), decoder.vocab_size)
            use_int8_cache(model, calibration_scales(path, ids, decoder.num_layers, *kv))
            onnx.save_model(model, str(path))
            kv_dtype = "int8"
            extra["kv_cache"] = {"scheme": "int8 symmetric, static scale per (layer, kv head, channel)",
                                 "calibration": f"{len(ids)} tokens of {text}", "margin": MARGIN}
        onnx.checker.check_model(str(path))  # path form: checks the external data too
        io = {
            "inputs": {
                "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
                "attention_mask": {"dtype": "int64", "shape": ["batch", "past + sequence"],
                                   "note": "ones for every token in the cache and this step"},
                "past_key_values.{i}.key|value": {"dtype": kv_dtype, "shape": ["batch", *kv[:1], "past", kv[1]]},
                "logits_to_keep": {"dtype": "int64", "shape": [1], "optional": True, "default": LOGITS_TO_KEEP_DEFAULT,
                                   "note": "0 = logits for every position, 1 = last position only (generation)"},
            },
            "outputs": {
                "logits": {"dtype": "float32", "shape": ["batch", "kept", decoder.vocab_size]},
                "present.{i}.key|value": {"dtype": kv_dtype, "shape": ["batch", kv[0], "past + sequence", kv[1]],
                                          "note": "may be bound to the same buffer as past (GroupQueryAttention shares it)"},
            },
            "kv_layout": {"layers": decoder.num_layers, "kv_heads": kv[0], "head_dim": kv[1], "dtype": kv_dtype,
                          "order": "batch, kv_heads, sequence, head_dim", "buffer_sharing": True},
        }
        if options.kv_bits == 8:
            io["kv_layout"]["scales"] = "in the graph: layers.{i}.attn.k_scale / v_scale, float32 [1, kv_heads, 1, head_dim]"
        return TargetOutput(MODEL_FILE, io, report, extra)

    def same_quant_weights(self, model, folder: Path, manifest: dict) -> dict:
        from ...quantize.awq import rescaled
        from ...quantize.replay import source_decoder

        weights = read_weights(folder, manifest)  # the weights as stored, dequantized
        if rescaled(manifest):  # awq rescaled the norms too: those stored, under `model`'s names for them
            weights |= read_norms(folder, manifest, source_decoder(model, manifest["max_context"]).norm_sources)
        return weights

    def package_checks(self, folder: Path, manifest: dict, model=None) -> list[dict]:
        """The file's weights read back and compared with the re-quantized reference, exactly (checks.py)."""
        from .checks import check_weights

        return [check_weights(Path(folder), manifest, model)]

    def app_readme(self, manifest: dict) -> str:
        from .handoff import app_readme

        return app_readme(manifest)

    def app_runtime_files(self, folder: Path, manifest: dict) -> dict:
        """genai_config.json: the folder opens in onnxruntime-genai (genai.py)."""
        from .genai import PACKAGE, write_genai_config

        return {PACKAGE: write_genai_config(folder, manifest)}


def read_norms(folder: Path, manifest: dict, names: dict[str, str]) -> dict:
    """The norm weights stored in the file (graph.py names them "layers.{i}.attn_norm", ..., "final_norm"),
    by the PyTorch names `names` gives for those."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(folder) / manifest["model_file"]))
    inits = {t.name: t for t in model.graph.initializer}
    return {name: numpy_helper.to_array(inits[slot]) for slot, name in names.items()}


def read_weights(folder: Path, manifest: dict) -> dict:
    """The float weights the artifact really computes with, by PyTorch parameter name.

    Used by `verify` to build the same-quant PyTorch reference: quantized entries are read back
    out of the .onnx file and dequantized with numpy (fused q|k|v split again, Phi-3's gate|up joined).
    """
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from .quant import dequantize_matmul_weight

    model = onnx.load(str(Path(folder) / manifest["model_file"]))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    report = json.loads((Path(folder) / manifest["quant"]["report"]).read_text())["weights"]
    out, parts = {}, {}
    for e in report:
        if e["bits"] is None:
            continue
        if e["name"] == "embed_tokens":
            if "embed_tokens.qweight" in inits:  # int8 rows; a table shared with lm_head is read below
                out["model.embed_tokens.weight"] = arr("embed_tokens.qweight").astype(np.float32) * arr("embed_tokens.scales")
            continue
        node = nodes[e["name"]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        zp = arr(f"{e['name']}.zero_points") if f"{e['name']}.zero_points" in inits else None
        w = dequantize_matmul_weight(arr(f"{e['name']}.qweight"), arr(f"{e['name']}.scales"), zp,
                                     attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"])
        # Phi-3 ships q|k|v fused already: one source, nothing to split.
        splits = e["split"] if len(e["sources"]) > 1 else [w.shape[0]]
        for src, part in zip(e["sources"], np.split(w, np.cumsum(splits)[:-1])):
            parts.setdefault(src, []).append(part)
    # Several entries of one source are parts of one fused PyTorch parameter (Phi-3's gate_up_proj
    # stored as gate and up), in order.
    out = {src: ps[0] if len(ps) == 1 else np.concatenate(ps) for src, ps in parts.items()} | out
    if next((e.get("shares") for e in report if e["name"] == "embed_tokens"), None):
        out["model.embed_tokens.weight"] = out["lm_head.weight"]
    return out
