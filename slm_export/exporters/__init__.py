"""Export targets, registered by name. A target is one module that registers an `Exporter`.

An exporter receives the neutral `Decoder` description and writes its model file(s) into a folder;
the shared pipeline (slm_export.export) does loading, tokenizer, manifest, report and the atomic
rename. Targets import their heavy SDK inside `write`, so the tool works where an SDK is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..registry import Registry

TARGETS: Registry = Registry("target")


@dataclass
class ExportOptions:
    max_context: int = 2048
    compute_precision: str | None = None  # None: the target's default (its compute_precisions[0])
    kv_bits: int = 32  # bits per KV-cache element (one of the target's kv_cache_bits)
    text_ids: list[int] | None = None  # calibration text through the model's tokenizer, if it has one
    text_source: str = "the shipped calibration passage"  # what text_ids are
    text_record: dict | None = None  # how to find that text again: {"file": path or None (shipped), "sha256"}
    bos_token_id: int | None = None  # the tokenizer's BOS id, if it has one (a runtime may record it in the model file)
    eos_token_ids: tuple[int, ...] = ()  # the stop ids: the generation config's and the tokenizer's EOS
    model_name: str = "model"  # the source's hub id, else its short name (a runtime may record it in the model file)

    def calibration(self, n: int, vocab_size: int) -> tuple[list[int], str]:
        """(ids, what they are) for calibration: the text's first n tokens (or all, if fewer).

        The shipped calibration passage (data/calibration.txt) is not the passage `verify` and the
        benchmarks judge on (data/passage.txt), so nothing is fitted to the text it is judged on.
        """
        if self.text_ids:
            return self.text_ids[:n], self.text_source
        n = min(n, 1024)
        ids = np.random.default_rng(0).integers(0, vocab_size, n).tolist()
        return ids, "random token ids (the model has no tokenizer: real text calibrates better)"


@dataclass
class TargetOutput:
    """What an exporter wrote: the manifest's target-specific part."""

    model_file: str
    io: dict  # inputs / outputs / kv layout, recorded in the manifest for app developers
    report: object  # QuantReport
    extra: dict = field(default_factory=dict)
    runtime: str | None = None  # the RUNTIMES name for these files, when not the exporter's `runtime`


class Exporter(Protocol):
    name: str
    runtime: str  # the RUNTIMES name that executes this target's files
    compute_precisions: tuple[str, ...]  # what --compute-precision may be here; the first is the default
    quantizes_activations: bool  # False: the spec's int8 activations become float (said at export)

    def kv_bits_for(self, compute_precision: str) -> tuple[int, ...]:
        """What --kv-bits may be at this compute precision; the first is the default."""

    def embedding_bits_for(self, bits: int) -> int:
        """The embedding's bits when --embedding-bits is not given, at weight --bits `bits`."""

    def check(self, spec, compute_precision: str) -> None:
        """Raise SlmExportError for what this target cannot do, before the model loads."""

    def check_model(self, shape, compute_precision: str | None = None) -> None:
        """Raise SlmExportError for a model (its `Decoder`, or fit's shape) this target's runtime cannot
        run, once its shape is known and before any quantization."""

    def limits(self, compute_precision: str | None = None) -> "TargetLimits":
        """What this target's kernels and format store (quantize/limits.py), at this compute precision."""

    def default_method(self, bits: int, symmetric: bool) -> str:
        """The quantization method (quantize/methods.py) used when the spec names none."""

    def write(self, decoder, spec, out_dir: Path, options: ExportOptions, plan, codes) -> TargetOutput:
        """Pack `codes` (the quantizer's output for `plan`) into this target's files in `out_dir`."""

    def same_quant_weights(self, model, folder: Path, manifest: dict) -> dict:
        """The float weights the artifact computes with, by PyTorch name (for same-quant parity).

        Read back out of the file (ONNX, Core ML), or the recorded spec applied to `model` with the
        very code its export used (ExecuTorch, whose weight check finds those codes in the file).
        """

    def app_readme(self, manifest: dict) -> str:
        """The README an app developer gets in a bundle of this target."""

    def app_runtime_files(self, folder: Path, manifest: dict) -> dict:
        """Write what lets other runtimes open the export folder as it is (after the tokenizer, before the
        manifest lists the files); returns {runtime: {"config": file or None, "files": [every file it reads],
        ...}} for the manifest's `app_runtimes` ({} for none). inspect and verify then refuse a folder
        missing one of those files."""

    def package_checks(self, folder: Path, manifest: dict, model) -> list[dict]:
        """Static checks of the written files, run by `verify` ({name, passed, detail} each). Each built-in
        target reads its stored weights back here (its exporters/<target>/checks.py) and requires exactly
        the codes and scales of `model` quantized again with the recorded plan (quantize/replay.py)."""

    def stand_in_runner(self, model, folder: Path, manifest: dict, threads=None):
        """For `verify` where the runtime cannot execute here; raises RuntimeUnavailable if none."""


class ExporterBase:
    """Defaults for targets whose runtime runs everywhere slm-export does."""

    compute_precisions: tuple[str, ...] = ("float32",)
    kv_cache_bits: tuple[int, ...] = (32,)  # what --kv-bits may be here; the first is the default
    quantizes_activations = True
    # What `slm-export fit` assumes about this target's runtime before anything is exported (its
    # weights' storage is in its `limits`).
    kv_bytes = 4  # bytes per KV-cache element
    runtime_overhead_mb = 52.0  # the runtime and its arenas in an app, beyond weights, KV cache and activations
    # Whether write() reads the decoder's weights only through np.asarray, one at a time (a `Stored`
    # weight is then read from the checkpoint when used: slm_export/stored.py); else the pipeline
    # reads them all into memory first.
    streams_weights = False
    # What an export to this target needs in memory at its peak (slm_export/memory.py): the interpreter
    # and libraries it loads (MB: the peak RSS of a tiny model's export), and resident bytes per fp32
    # weight byte of the model at each --bits (loading, quantizing without calibration, writing; a
    # calibrating export also has quantize/calibration.py's CALIBRATION_PEAK). Each target's figures
    # are fitted to peak RSS measured by benchmarks/export_memory.py (benchmarks/EXPORT_MEMORY.md).
    export_base_mb = 524.0
    export_peak = {4: 4.4, 8: 4.4, 16: 5.9}
    # Streaming a checkpoint, what write() holds per fp32 weight byte beyond the quantizer's codes (memory.py)
    stream_write = {4: 1.0, 8: 1.0, 16: 1.0}

    def peak_per_fp32_byte(self, spec) -> float:
        """`export_peak` at the spec's --bits (a model in memory, not streamed: slm_export/memory.py)."""
        return self.export_peak[spec.bits if spec.bits in self.export_peak else max(self.export_peak)]

    def streams(self, spec) -> bool:
        """Whether write() reads the weights one at a time under the resolved `spec` (`streams_weights`)."""
        return self.streams_weights

    def kv_bits_for(self, compute_precision: str) -> tuple[int, ...]:
        return self.kv_cache_bits

    def resolve_precision(self, compute_precision: str | None, kv_bits: int | None) -> tuple[str, int]:
        """(compute precision, KV-cache bits) for this target: the defaults, or the asked ones if it has them."""
        from ..errors import SlmExportError

        if compute_precision is not None and compute_precision not in self.compute_precisions:
            raise SlmExportError(f"--compute-precision {compute_precision} is not available for the {self.name} "
                                 f"target; use {' or '.join(self.compute_precisions)}")
        precision = compute_precision or self.compute_precisions[0]
        kv_choices = self.kv_bits_for(precision)
        if kv_bits is None:
            kv_bits = kv_choices[0]
        elif kv_bits not in kv_choices:
            at = f" at --compute-precision {precision}" if kv_choices != self.kv_cache_bits else ""
            raise SlmExportError(f"--kv-bits {kv_bits} is not available for the {self.name} target{at}; "
                                 f"use {' or '.join(map(str, kv_choices))}")
        return precision, kv_bits

    def app_runtime_files(self, folder: Path, manifest: dict) -> dict:
        return {}

    def check_model(self, shape, compute_precision: str | None = None) -> None:
        """Refuse a model whose shape the runtime cannot run (declared in `limits`), naming the targets that can."""
        limits = self.limits(compute_precision)
        if not limits.runs(shape):
            others = [n for n in TARGETS.names() if n != self.name and TARGETS.get(n)().limits().runs(shape)]
            limits.check_model(shape, others)

    def plan(self, decoder, spec, compute_precision: str | None = None):
        """The quantization plan of `decoder` under `spec` on this target (quantize/plan.py)."""
        from ..quantize.plan import plan_for_decoder

        return plan_for_decoder(spec, self.limits(compute_precision), decoder, self.default_method)

    def quantize(self, decoder, spec, compute_precision: str | None = None, calibration_ids=None,
                 int8_units: list[str] | None = None, awq_alphas: dict | None = None):
        """(plan, codes): the plan and the one quantizer's codes for it, as an export makes them.

        With awq, `decoder` is first rescaled in place (quantize/awq.py; the float model computes the
        same), so what is written and checked afterwards is that model; its scales are chosen on the
        calibration text, or given (`awq_alphas`, as an export recorded them). With mixed precision,
        the units moved to int8 are measured on the calibration text, or given (`int8_units`)."""
        from ..quantize.mixed import promote, promote_units, unit_sensitivity
        from ..quantize.quantizer import quantize

        plan = self.plan(decoder, spec, compute_precision)
        if plan.equalizes:
            from ..quantize.awq import activation_rounding, equalize

            alphas = equalize(decoder, plan, calibration_ids, activation_rounding(plan.limits, spec), awq_alphas)
            plan.calibration["awq"] = {"alphas": alphas}
        if spec.mixed_precision and not spec.palettize:
            if int8_units is not None:
                plan = promote_units(plan, int8_units, spec.mixed_precision)
            else:
                if not calibration_ids:
                    raise ValueError("mixed precision measures sensitivity on calibration token ids")
                plan = promote(plan, unit_sensitivity(decoder, plan, calibration_ids), spec.mixed_precision)
        if spec.palettize:  # Core ML's k-means palettes are not codes and scales: its exporter makes them
            return plan, {}
        return plan, quantize(decoder, plan, calibration_ids if plan.calibrated else None)

    def embedding_bits_for(self, bits: int) -> int:
        """The embedding's bits when --embedding-bits is not given, at weight --bits `bits`."""
        return 8

    # At --bits 4, what --mixed-precision (quantize/mixed.py: the size fraction spent on int8 for the
    # most sensitive weights) and --lm-head-bits are when not given; None: the lm_head takes --bits.
    default_mixed_precision = 0.0
    default_lm_head_bits: int | None = None

    def default_method(self, bits: int, symmetric: bool) -> str:
        # GPTQ: of the methods here, the least KL on every target (benchmarks/quality.py)
        return "gptq"

    def default_activations(self, bits: int) -> str:
        """int8 (quantized on the fly) or float activations when the spec leaves them unset."""
        return "int8" if self.quantizes_activations else "float"

    def calibrates(self, kv_bits: int) -> bool:
        """Whether the export runs calibration text through the model (for static KV-cache scales)."""
        return False

    def kv_element_bytes(self, kv_bits: int, head_dim: int) -> float:
        """Bytes per cached key or value element at --kv-bits (for `fit`)."""
        return self.kv_bytes if kv_bits == 32 else kv_bits / 8


    def package_checks(self, folder: Path, manifest: dict, model) -> list[dict]:
        return []  # the runtime executes the files; verify's parity metrics are the check

    def stand_in_runner(self, model, folder: Path, manifest: dict, threads=None):
        from ..errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"the {self.name} target has no stand-in for its runtime")


def _register_builtin_targets() -> None:
    from . import coreml, executorch, onnx  # noqa: F401  (register "coreml", "executorch", "onnx")


_register_builtin_targets()
