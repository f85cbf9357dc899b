"""The quantization spec: validated once here, mapped to each target by its exporter.

Which weight gets what is decided by ordered regex rules, first match wins (the same idea as
ExecuTorch's quant configs): the embedding, then the lm_head, then every other linear weight.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from ..errors import SlmExportError

VALID_BITS = (16, 8, 4)
ACTIVATIONS = ("int8", "float")


@dataclass(frozen=True)
class WeightRequest:
    """What the spec asks for one weight. bits=None means it stays float, with `reason`.
    The plan (plan.py) resolves it against a target's limits."""

    bits: int | None
    group_size: int
    symmetric: bool
    reason: str


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    # "int8": activations are quantized to int8 on the fly where the target can (ONNX MatMulNBits
    # accuracy_level=4, ExecuTorch 8da4w); "float": weight-only quantization.
    activations: str | None = None  # None: the target's default, filled in by `resolve_spec` below
    embeddings: bool = True
    # None: the target's default, filled in by the pipeline (`resolve_spec` below) before anything reads it
    embedding_bits: int | None = None
    lm_head: bool = True
    # None: the lm_head takes `bits` like every linear. 8 keeps it int8 at --bits 4, as llama.cpp's
    # Q4_0 keeps its output tensor Q8_0: lower KL, slower decode (the lm_head is the widest matmul).
    lm_head_bits: int | None = None
    # Core ML only: a k-means lookup table of 2**bits values per group of output channels instead
    # of linear (scale) quantization.
    palettize: bool = False
    # The algorithm that chooses codes and scales (quantize/methods.py); None: the target's default.
    method: str | None = None
    # Mixed precision (quantize/mixed.py): up to this fraction more stored bytes, spent on int8 for the
    # int4 weights whose rounding costs the most KL on the calibration text. 0: off. None: the
    # target's default, filled in by `resolve_spec` below.
    mixed_precision: float | None = None

    def __post_init__(self):
        if self.bits not in VALID_BITS:
            raise SlmExportError(
                f"--bits {self.bits} is not supported; use one of {', '.join(map(str, VALID_BITS))} "
                "(16 = no weight quantization)"
            )
        if self.embedding_bits not in (None, 8, 4):
            raise SlmExportError(f"--embedding-bits {self.embedding_bits} is not supported; use 8 or 4")
        if self.lm_head_bits not in (None, 8, 4):
            raise SlmExportError(f"--lm-head-bits {self.lm_head_bits} is not supported; use 8 or 4")
        if self.lm_head_bits is not None and not (self.lm_head and self.bits != 16):
            why = "--no-quantize-lm-head keeps it float" if self.bits != 16 else "--bits 16 quantizes nothing"
            raise SlmExportError(f"--lm-head-bits {self.lm_head_bits} has no effect: {why}; drop one of the two")
        gs = self.group_size
        if not isinstance(gs, int) or gs < 16 or gs > 4096 or gs & (gs - 1):
            raise SlmExportError(
                f"--group-size {gs} is not valid; use a power of two from 16 to 4096 (for example 32, 64, 128)"
            )
        if self.palettize and not self.quantized:
            raise SlmExportError("--palettize needs --bits 4 or 8 (the palette has 2**bits entries)")
        if self.method is not None:
            from .methods import METHODS

            if self.method not in METHODS:
                raise SlmExportError(f"--quant-method {self.method} is not known; use one of: {', '.join(METHODS.names())}")
            if not self.quantized:
                raise SlmExportError(f"--quant-method {self.method} has no effect: --bits 16 quantizes nothing; drop one of the two")
            if self.palettize:
                raise SlmExportError(f"--quant-method {self.method} has no effect with --palettize (k-means lookup tables); "
                                     "drop one of the two")
            if self.method == "hqq" and not self.symmetric:
                raise SlmExportError("--quant-method hqq chooses symmetric scales only; drop --asymmetric, or use "
                                     "rtn, mse or gptq with it")
        mp = self.mixed_precision
        if mp is not None:
            if not isinstance(mp, (int, float)) or not 0 <= mp <= 1:
                raise SlmExportError(f"--mixed-precision {mp} is not valid; use a fraction from 0 (off) to 1 "
                                     "(up to twice the int4 size), for example 0.1")
            if mp and self.bits != 4:
                raise SlmExportError(f"--mixed-precision {mp} needs --bits 4 (it moves int4 weights to int8); "
                                     f"drop it, or use --bits 4")
            if mp and self.palettize:
                raise SlmExportError("--mixed-precision does not apply to --palettize (k-means tables); drop one of the two")
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise SlmExportError(
                f"activations '{self.activations}' is not valid; use one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    def label(self) -> str:
        if not self.quantized:
            return "float"
        act = "wo" if self.activations == "float" else "a8"
        if self.palettize:
            return f"palette{self.bits}-{act}"
        head = f"-head{self.lm_head_bits}" if self.lm_head_bits not in (None, self.bits) else ""
        method = f"-{self.method}" if self.method else ""
        return f"int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}-{act}{head}{method}"

    def with_defaults(self, embedding_bits: int, mixed_precision: float, lm_head_bits: int | None,
                      activations: str = "int8") -> "QuantSpec":
        """This spec with a target's defaults for what it leaves unset (None)."""
        four = self.bits == 4 and not self.palettize
        head = self.lm_head_bits if self.lm_head_bits is not None or not (four and self.lm_head) else lm_head_bits
        return replace(self, embedding_bits=self.embedding_bits if self.embedding_bits is not None else embedding_bits,
                       mixed_precision=self.mixed_precision if self.mixed_precision is not None else
                       (mixed_precision if four else 0.0), lm_head_bits=head,
                       activations=self.activations or activations)

    def rules(self) -> list[tuple[str, int | None, str]]:
        """Ordered (regex, bits, reason) rules over weight names; the first match wins."""
        if not self.quantized:
            return [(r".*", None, "bits=16: no weight is quantized")]
        if self.embeddings and self.embedding_bits is None:
            raise ValueError("embedding_bits is unset: the target's default is filled in by "
                             "quantize.spec.resolve_spec(exporter, spec) before the spec is applied")
        emb_bits = self.embedding_bits if self.embeddings else None
        return [
            (r"(^|\.)embed_tokens\.weight$", emb_bits,
             "spec: embeddings" + ("" if self.embeddings else " excluded (--no-quantize-embeddings)")),
            (r"(^|\.)lm_head\.weight$", (self.lm_head_bits or self.bits) if self.lm_head else None,
             "spec: lm_head" + ("" if self.lm_head else " excluded (--no-quantize-lm-head)")
             + (f" (--lm-head-bits {self.lm_head_bits})" if self.lm_head_bits else "")),
            (r"norm", None, "norm scales are 1-D vectors, kept float"),
            (r"bias$", None, "biases are kept float"),
            (r".*", self.bits, "spec: linear weights"),
        ]

    def plan_for(self, weight_name: str) -> WeightRequest:
        for pattern, bits, reason in self.rules():
            if re.search(pattern, weight_name):
                return WeightRequest(bits, self.group_size, self.symmetric, reason)
        raise AssertionError("the catch-all rule always matches")  # pragma: no cover

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def resolve_spec(exporter, spec: QuantSpec | None) -> QuantSpec:
    """`spec` (default: QuantSpec()) with this target's defaults for what it leaves unset (embedding
    bits, mixed precision, lm_head bits)."""
    spec = spec or QuantSpec()
    return spec.with_defaults(exporter.embedding_bits_for(spec.bits), exporter.default_mixed_precision,
                              exporter.default_lm_head_bits, exporter.default_activations(spec.bits))


def quant_label(spec: QuantSpec, precision: str) -> str:
    # "float" names fp32 weights; unquantized weights in an fp16 program are "float16"
    return "float16" if not spec.quantized and precision == "float16" else spec.label()


def block_size_for(k: int, group_size: int, minimum: int = 16) -> tuple[int, str]:
    """Largest power-of-two block <= group_size that divides k, else group_size with a padded tail.

    Returns (block, note). A weight is never left in float because its width does not divide.
    """
    block = group_size
    while block >= minimum:
        if k % block == 0:
            note = "" if block == group_size else f"in-features {k} not divisible by {group_size}: fell back to group {block}"
            return block, note
        block //= 2
    return group_size, f"in-features {k} not divisible by 16: last group of {group_size} zero-padded"
