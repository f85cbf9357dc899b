"""slm-export: quantize small language models and export them for devices, with parity checks.

    import slm_export
    art = slm_export.export(target="onnx", bits=4)            # the bundled SmolLM2-135M-Instruct
    art = slm_export.export("path/or/org-name", target="onnx", bits=8, out="smol-int8")
    art = slm_export.export(my_trained_model, tokenizer=tok, target="onnx", bits=4)
    print(art.generate("What is the capital of France?"))
    report = art.verify()                                      # parity against PyTorch
    rows = art.bench()                                         # latency and memory here

Imports stay light (no torch) so runners can use this package on devices.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["export", "open_artifact", "QuantSpec", "SlmExportError", "ParityFailure", "OutOfMemory", "targets"]

from .errors import OutOfMemory, ParityFailure, SlmExportError
from .quantize import QuantSpec


def export(model=None, *, target: str = "onnx", bits: int = 4, group_size: int = 32, symmetric: bool = True,
           activations: str | None = None, quantize_embeddings: bool = True, embedding_bits: int | None = None,
           quantize_lm_head: bool = True, lm_head_bits: int | None = None, palettize: bool = False, compute_precision: str | None = None,
           kv_bits: int | None = None, quant_method: str | None = None, mixed_precision: float | None = None,
           calibration_text=None, out=None, force: bool = False,
           max_context: int | None = None, tokenizer=None, no_tokenizer: bool = False,
           trust_remote_code: bool = False, skip_memory_check: bool = False, log=print):
    """Export `model` to `target` and return an `Artifact`.

    max_context: KV-cache length; default min(2048, the model's max_position_embeddings).
    embedding_bits: 8 (int8 rows) or 4 (int4 groups); default: the target's (ExecuTorch: 4 at bits=4, else 8).
    lm_head_bits: 8 or 4; default `bits`. 8 with bits=4 keeps the output layer int8 (better quality).
    palettize: Core ML only, k-means palettes of 2**bits entries instead of linear quantization.
    compute_precision: "float16" (Core ML's default) or "float32"; ExecuTorch: "float32" (default) or
    "float16" (an fp16 program: fp16 weights, activations and KV cache; with bits=16); ONNX: float32.
    kv_bits: KV-cache element bits, 32, (ExecuTorch; Core ML only) 16, or (ExecuTorch, ONNX) 8; default: the target's
    first choice (16 for an fp16 ExecuTorch program, which keeps an fp16 cache). ONNX's int8 cache has
    static per-channel scales calibrated at export.
    quant_method: how codes and scales are chosen (rtn, mse, hqq, gptq; see `slm-export methods`);
    default: the target's. Calibrated methods (gptq) and the ONNX int8 cache read the shipped
    calibration passage, or `calibration_text` (a UTF-8 file: text like your users', e.g. another
    language or code; up to 2048 tokens are used).
    mixed_precision: at bits=4, the fraction of extra size spent on int8 for the weights whose int4
    rounding costs the most KL on the calibration text (0 = off); default: the target's.
    model: None (bundled SmolLM2-135M-Instruct), a hub id, a local folder, a .gguf file, or a
    transformers causal LM object of a supported architecture (pass its `tokenizer` to use
    generate/bench on real text).
    no_tokenizer: export a model folder, hub id or .gguf without its tokenizer (one without tokenizer
    files is refused otherwise); the artifact then has none: generate cannot run, verify and bench
    use random token ids.
    skip_memory_check: export even where the estimated peak memory exceeds what this machine has (free
    memory, a cgroup limit, ulimit -v); otherwise such an export is refused before the model loads.
    An export that runs out of memory anyway raises `OutOfMemory` (an `SlmExportError`; CLI exit 3).
    """
    from .pipeline import run_export

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, activations=activations,
                     embeddings=quantize_embeddings, embedding_bits=embedding_bits, lm_head=quantize_lm_head,
                     lm_head_bits=lm_head_bits, palettize=palettize, method=quant_method,
                     mixed_precision=mixed_precision)
    folder = run_export(model, target=target, spec=spec, out=out, force=force, max_context=max_context,
                        compute_precision=compute_precision, kv_bits=kv_bits, calibration_text=calibration_text,
                        tokenizer=tokenizer, no_tokenizer=no_tokenizer, trust_remote_code=trust_remote_code,
                        skip_memory_check=skip_memory_check, log=log)
    return open_artifact(folder)


def open_artifact(path):
    """Open an exported folder (checks every file against the manifest's sha256)."""
    from .artifact import Artifact

    return Artifact.open(path)


def targets() -> list[str]:
    from .exporters import TARGETS

    return TARGETS.names()
