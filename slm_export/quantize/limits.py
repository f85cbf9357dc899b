"""What a target's kernels and file format can store, declared once by each exporter.

The plan (plan.py) resolves the user's spec against these facts; the quantizer, `fit`, the per-weight
report and `verify` read them from here instead of asking which target it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SlmExportError

SCALE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class TargetLimits:
    target: str
    linear_bits: tuple[int, ...] = (4, 8)
    # Smallest int4 group the kernels take (a power of two); a group that divides no width is refused.
    min_group: int = 16
    # A width that no power-of-two group >= min_group divides: "pad" zero-pads the last group
    # (MatMulNBits), "int8" stores that weight int8 per output channel instead.
    indivisible: str = "pad"
    int8_per_channel: bool = False  # int8 linears: one scale per output channel (else per group)
    zero_points: bool = True  # linear weights may be asymmetric (the format stores zero points)
    # Scales may be negative (a group's extreme weight then maps to -8 whatever its sign). XNNPACK
    # refuses a program with a negative scale, so its codes use positive scales only.
    signed_scales: bool = True
    # Precision the format keeps scales in, by weight bits (codes are chosen against it).
    scale_dtype: dict = field(default_factory=lambda: {4: "float32", 8: "float32"})
    embedding_bits: tuple[int, ...] = (8, 4)  # what a table of its own may be stored at
    embedding_min_group: int = 16
    embedding_scale_dtype: str = "float32"
    embedding_zero_points: bool = True  # a table of its own may be asymmetric (else it is stored symmetric)
    # A tied embedding and lm_head: "separate" (two tables), "shared-if-alike" (the embedding gathers
    # rows out of the lm_head's codes when both rules ask the same bits, symmetric), "shared" (one
    # table, at the finer of the two rules' bits).
    tied_table: str = "separate"
    shared_table_copies_scales: bool = False  # a shared table stores its scales a second time
    # How the kernels quantize activations on the fly (int8 activations): "per-block" (32 values
    # per scale), "per-token" (one scale per row), or "none" (weight-only targets).
    activation_rounding: str = "per-block"
    weight_only_bits: tuple[int, ...] = (4, 8)  # what --weight-only (float activations) may be
    # Weights planned finer than --bits (an int8 lm_head, mixed-precision units in an int4 program) run
    # on float activations where weight_only_bits has their kernel, even when the rest round theirs to
    # int8 (XNNPACK's int8 per-channel GEMM on fp32 input: no per-token rounding, unlike its 8da8w).
    finer_weights_float_activations: bool = False
    # Whether an export may rescale the norms before rounding (awq, quantize/awq.py): verify's same-quant
    # reference must then carry the rescaled norms, which this target's verify gives back.
    rescaled_norms: bool = True
    float_bytes: int = 4  # bytes per weight kept float
    # The runtime's attention kernel: the head sizes it runs (a multiple of this), and its name for the message.
    head_dim_multiple: int = 1
    attention_kernel: str = "its attention kernel"

    def activations_for(self, bits: int, spec) -> str:
        """What a linear of `bits` weights runs on in a program quantized by `spec`: "int8" or "float"."""
        finer = self.finer_weights_float_activations and bits > spec.bits and bits in self.weight_only_bits
        return "float" if finer else spec.activations

    def scale_precision(self, bits: int) -> str:
        return self.scale_dtype.get(bits, "float32")

    def scale_bytes(self, bits: int, kind: str = "linear") -> int:
        return SCALE_BYTES[self.scale_precision(bits) if kind == "linear" else self.embedding_scale_dtype]

    def runs(self, shape) -> bool:
        """Whether the runtime can run a model of this shape (anything with a `head_dim`)."""
        return shape.head_dim % self.head_dim_multiple == 0

    def check_model(self, shape, others: list[str] = ()) -> None:
        """Refuse a model the runtime cannot run (one line: the fact, the model's value, the targets that can)."""
        if self.runs(shape):
            return
        instead = f"export it with {' or '.join(f'--target {n}' for n in others)}" if others else "no target here runs it"
        raise SlmExportError(f"the {self.target} target cannot run this model: {self.attention_kernel} needs a head_dim "
                             f"that is a multiple of {self.head_dim_multiple}, and this model's is {shape.head_dim}; "
                             f"{instead}")

    def check(self, spec) -> None:
        """Refuse, before anything loads, a spec these kernels cannot store (one line: the flag and what works)."""
        if not spec.quantized:
            return
        t = self.target
        if spec.bits not in self.linear_bits:
            raise SlmExportError(f"--bits {spec.bits} is not supported by the {t} target; use "
                                 f"{' or '.join(map(str, self.linear_bits))} (or 16)")
        if spec.bits == 4 and spec.group_size < self.min_group:
            raise SlmExportError(f"--group-size {spec.group_size} is too small for the {t} target: its int4 kernels "
                                 f"take groups of at least {self.min_group} (use {self.min_group}, "
                                 f"{self.min_group * 2}, ...)")
        if not spec.symmetric and not self.zero_points:
            raise SlmExportError(f"--asymmetric is not supported by the {t} target: its int4/int8 linear kernels "
                                 "store no zero points; drop --asymmetric")
        from .methods import EQUALIZING

        if spec.method in EQUALIZING and not self.rescaled_norms:
            raise SlmExportError(f"--quant-method {spec.method} is not available for the {t} target yet: it rescales "
                                 "the norms, which this target's verify cannot give back to PyTorch; use "
                                 "--quant-method gptq")
        if spec.activations == "float" and spec.bits not in self.weight_only_bits:
            raise SlmExportError(
                f"--weight-only with --bits {spec.bits} is not supported by the {t} target: its float-activation "
                f"kernels take int{' or int'.join(map(str, self.weight_only_bits))} weights; use "
                f"--bits {self.weight_only_bits[0]} --weight-only, or drop --weight-only")
