"""`slm-export fit`: will this model fit on that device, and roughly how fast will it decode?

Memory = weights (per weight: the quant report of an exported artifact, or the same spec's rules
applied to the model's shapes) + KV cache (layers x 2 x kv heads x head dim x context x bytes)
+ activations (one prefill chunk) + the runtime's own overhead, against the profile's app budget.

Decode speed starts from a roofline: a decode step reads every weight once (the embedding: one
row) plus the KV cache so far, so tok/s <= sustained bandwidth / bytes per token; and it does ~2
ops per weight, so tok/s <= the big cores' peak ops / ops per token. The smaller bound is the
ceiling. `expected` adds what a real runtime spends per layer beyond moving bytes (launching and
synchronising kernels, dequantizing), STEP_CYCLES_PER_LAYER, scaled by the device's clock.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SlmExportError
from .units import GB, MB

# Fixed cost of one decoder layer per decode step, in CPU cycles, beyond the roofline. Calibrated
# once on this machine (2.6 GHz, 34 GB/s read): SmolLM2-135M int4 ONNX decoded at 139 tok/s (7.2 ms
# a step) where the roofline gives 2.6 ms, so 30 layers cost ~4.6 ms, ~154 us each. How well this one
# constant predicts the other bit widths and contexts is measured by benchmarks/fit_check.py (docs/devices.md "fit: will it fit").
STEP_CYCLES_PER_LAYER = 400_000
PREFILL_CHUNK = 128  # default prompt length whose activations the estimate holds at once


@dataclass
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    weights: list  # [(name, [out, in])] of every 2-D weight


def shape_of(config) -> Shape:
    """Every 2-D weight's name and shape, from a transformers config (meta tensors: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = [(n, list(p.shape)) for n, p in model.named_parameters() if p.dim() == 2]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and not any(n == "lm_head.weight" for n, _ in weights):  # named_parameters skips the shared one
        weights.append(("lm_head.weight", next(s for n, s in weights if n.endswith("embed_tokens.weight"))))
    heads = config.num_attention_heads
    return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                 heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 vocab=config.vocab_size, tied=tied, weights=weights)


def shape_from_manifest(m: dict, weights: list[dict]) -> Shape:
    d = m["model"]
    return Shape(layers=d["layers"], hidden=d["hidden_size"], heads=d["heads"], kv_heads=d["kv_heads"],
                 head_dim=d["head_dim"], vocab=d["vocab_size"], tied=d["tied_embeddings"],
                 intermediate=max(w["shape"][1] for w in weights),  # the down projection's in-features
                 weights=[(w["name"], w["shape"]) for w in weights])


def shape_before_loading(model, trust_remote_code: bool = False) -> Shape | None:
    """The model's shapes without loading its weights (its config only), or None where they cannot be
    read before loading (loading then says why, or the weights themselves are counted): a path, a
    .gguf, a hub id, None (bundled), or a model already in memory."""
    from .loading import LoadedModel

    obj = model.model if isinstance(model, LoadedModel) else model
    try:
        if obj is None or isinstance(obj, (str, os.PathLike)):
            return shape_of(load_config(obj, trust_remote_code))
        config = getattr(obj, "config", None)
        return shape_of(config) if config is not None else None
    except Exception:  # noqa: BLE001 - a config that cannot be read here is for loading to report
        return None


def load_config(source, trust_remote_code: bool = False):
    """The model's config only (seconds, not the weights): a path, a .gguf, a hub id, or None (bundled)."""
    from transformers import AutoConfig

    from .loading import DEFAULT_MODEL, default_gguf_path, hub_timeouts

    if source is None or str(source) == DEFAULT_MODEL:
        source = default_gguf_path()
    path = Path(str(source)).expanduser()
    if not path.exists():
        hub_timeouts()
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.exists() and not (path / "config.json").is_file():
            raise SlmExportError(f"model {path} has no config.json; pass a Hugging Face folder, a .gguf or a hub id")
        return AutoConfig.from_pretrained(str(path) if path.exists() else str(source), trust_remote_code=trust_remote_code)
    except SlmExportError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's file or id that cannot be read
        raise SlmExportError(f"could not read the config of model {source}: {str(e).splitlines()[0][:200]}; "
                             "check the path or id (the hub needs internet)") from None


def estimate_weight_bytes(shape: Shape, spec, exporter, compute_precision: str | None = None) -> list[dict]:
    """Stored bytes of each weight as `exporter` would store it under `spec` (before exporting): the
    quantization plan the export itself would make, on the model's shapes."""
    from .quantize.plan import EMBEDDING, resolve

    shapes = [(name, name, (rows, cols), "embedding" if name.endswith(EMBEDDING) else "linear")
              for name, (rows, cols) in shape.weights]
    plan = resolve(spec, exporter.limits(compute_precision), shapes, shape.tied, exporter.default_method)
    out = [{"name": w.name, "shape": list(w.shape), "bits": w.bits, "stored_bytes": int(plan.stored_bytes(w))}
           for w in plan.weights]
    if spec.mixed_precision:  # which weights go int8 is measured at export; the budget bounds their bytes
        extra = spec.mixed_precision * sum(w["stored_bytes"] for w in out)
        out.append({"name": f"mixed precision: int8 for the most sensitive weights (up to +{spec.mixed_precision:.0%})",
                    "shape": [0, 0], "bits": 8, "stored_bytes": int(extra)})
    return out


def report_weight_bytes(folder: Path) -> list[dict]:
    """Stored bytes per weight from an exported artifact's quant report (the real sizes)."""
    from . import manifest as mf

    m = mf.read(folder)
    entries = json.loads((Path(folder) / m["quant"]["report"]).read_text())["weights"]
    return [{"name": e["name"], "shape": e["shape"], "bits": e["bits"], "stored_bytes": e["stored_bytes"]}
            for e in entries]


@dataclass
class FitReport:
    device: str
    target: str
    quant: str
    context: int
    weights_source: str
    weights_mb: float
    kv_cache_mb: float
    kv_bits: int  # bits per cached key/value element (--kv-bits)
    activations_mb: float
    prompt_tokens: int
    runtime_overhead_mb: float
    total_mb: float
    app_budget_mb: float
    fits: bool
    decode_bytes_per_token_mb: float  # at a short context
    roofline_tok_s: float  # the ceiling at a short context
    roofline_tok_s_full_context: float
    expected_decode_tok_s: float
    expected_decode_tok_s_full_context: float
    bound: str  # "memory bandwidth" or "compute"
    export_peak_mb: float  # what exporting it needs in memory at its peak, on the machine that exports (memory.py)
    notes: list[str] = field(default_factory=list)
    weights: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        lines = [f"{self.target} {self.quant} on {self.device}, context {self.context}: {verdict} "
                 f"({self.total_mb:.0f} MB of a {self.app_budget_mb:.0f} MB app budget)",
                 f"  weights      {self.weights_mb:8.1f} MB  ({self.weights_source})",
                 f"  KV cache     {self.kv_cache_mb:8.1f} MB  ({self.kv_bits}-bit)",
                 f"  activations  {self.activations_mb:8.1f} MB  (a {self.prompt_tokens}-token prompt in one pass)",
                 f"  runtime      {self.runtime_overhead_mb:8.1f} MB",
                 f"  decode: ~{self.expected_decode_tok_s:.0f} tok/s expected at a short context, "
                 f"~{self.expected_decode_tok_s_full_context:.0f} at {self.context} "
                 f"(roofline ceilings {self.roofline_tok_s:.0f} / {self.roofline_tok_s_full_context:.0f}; "
                 f"{self.bound}-bound; {self.decode_bytes_per_token_mb:.1f} MB read per token)",
                 f"  export: about {self.export_peak_mb * MB / GB:.1f} GB of memory at its peak, on the machine that "
                 "runs slm-export (refused up front where it has less)"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def kv_bytes_per_token(shape: Shape, kv_bytes: float) -> float:
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * kv_bytes


def bytes_read_per_token(weights: list[dict]) -> int:
    """Weight bytes one decode step reads: every matrix, but one row of the embedding, unless the
    embedding's table is also the lm_head (no separate lm_head entry: Core ML's tied table)."""
    separate_head = any("lm_head" in w["name"] for w in weights)
    return sum(w["stored_bytes"] // w["shape"][0] if separate_head and "embed_tokens" in w["name"]
               else w["stored_bytes"] for w in weights)


def ops_per_token(weights: list[dict]) -> int:
    """~2 ops per weight a decode step multiplies with (the embedding is a lookup, unless it is the lm_head)."""
    separate_head = any("lm_head" in w["name"] for w in weights)
    return 2 * sum(w["shape"][0] * w["shape"][1] for w in weights
                   if not (separate_head and "embed_tokens" in w["name"]))


def expected_tok_s(ceiling_tok_s: float, layers: int, profile) -> float:
    """The roofline ceiling slowed by the fixed per-layer cost of a real decode step."""
    return 1 / (1 / ceiling_tok_s + layers * STEP_CYCLES_PER_LAYER / (profile.big_core_ghz * 1e9))


def decode_roofline(profile, weight_bytes_per_token: float, kv_bytes_so_far: float, ops_per_token: float,
                    int8: bool) -> tuple[float, str]:
    """(tok/s ceiling, what bounds it) on `profile` for one decode step."""
    memory = profile.sustained_bandwidth_gb_s * 1e9 / (weight_bytes_per_token + kv_bytes_so_far)
    compute = profile.compute_gops(int8) * 1e9 / ops_per_token
    return (memory, "memory bandwidth") if memory <= compute else (compute, "compute")


def fit(profile, *, target: str = "onnx", spec=None, context: int = 2048, prompt_tokens: int = PREFILL_CHUNK,
        model=None, artifact=None, compute_precision: str | None = None, kv_bits: int | None = None,
        trust_remote_code: bool = False) -> FitReport:
    from .exporters import TARGETS
    from .memory import estimate_export, fp32_weight_bytes
    from .quantize.spec import quant_label, resolve_spec
    from .quantize import QuantSpec

    for flag, value in (("--context", context), ("--prompt-tokens", prompt_tokens)):
        if value < 1:
            raise SlmExportError(f"{flag} {value} must be at least 1 (tokens)")
    notes = []
    if artifact is not None:  # the real sizes and the recorded shape: no config needed
        from . import manifest as mf

        m = mf.read(artifact)
        target, quant = m["target"], m["quant"]["label"]
        spec = QuantSpec.from_dict(m["quant"]["spec"])
        weights, source = report_weight_bytes(Path(artifact)), f"quant report of {artifact}"
        shape = shape_from_manifest(m, weights)
        if context > m["max_context"]:
            notes.append(f"the artifact's KV cache holds {m['max_context']} tokens; re-export with --max-context {context}")
        if compute_precision is not None or kv_bits is not None:
            raise SlmExportError("--compute-precision and --kv-bits describe an export to plan; with --artifact, "
                                 "fit uses what the artifact was exported with (drop them)")
        extra = m.get("target_extra", {})
        compute_precision, kv_bits = extra.get("compute_precision"), extra.get("kv_bits")
        fp32_bytes = 4 * m["model"].get("parameters", 0)
    exporter = TARGETS.get(target)()
    precision, kv_bits = exporter.resolve_precision(compute_precision, kv_bits)
    if artifact is None:
        spec = resolve_spec(exporter, spec)
        exporter.check(spec, precision)  # what the export would refuse, refused here too
        config = load_config(model, trust_remote_code)
        shape = shape_of(config)
        exporter.check_model(shape, precision)  # a model the export would refuse, refused here too
        weights = estimate_weight_bytes(shape, spec, exporter, precision)
        fp32_bytes = fp32_weight_bytes(shape)
        source = "estimated from the model's shapes and the spec"
        quant = quant_label(spec, precision)
        limit = getattr(config, "max_position_embeddings", None)
        if limit and context > limit:
            notes.append(f"the model was trained for {limit} tokens of context, fewer than {context}")
    if target not in profile.formats:
        notes.append(f"{target} does not run on {profile.name} (it runs {', '.join(profile.formats)})")
    weights_total = sum(w["stored_bytes"] for w in weights)
    per_token_weights, ops = bytes_read_per_token(weights), ops_per_token(weights)
    kv_per_token = kv_bytes_per_token(shape, exporter.kv_element_bytes(kv_bits, shape.head_dim))
    chunk = min(prompt_tokens, context)  # the runners prefill a prompt in one pass
    act = 4 * chunk * (4 * shape.hidden + 3 * shape.intermediate + shape.vocab) + 4 * shape.heads * chunk * context
    int8 = spec.quantized and spec.activations == "int8" and exporter.quantizes_activations
    short, bound = decode_roofline(profile, per_token_weights, kv_per_token * 64, ops, int8)
    full, _ = decode_roofline(profile, per_token_weights, kv_per_token * context, ops, int8)
    mb = MB
    total = weights_total + kv_per_token * context + act + exporter.runtime_overhead_mb * mb
    from .loading import streamable

    export_peak = estimate_export(exporter, spec, kv_bits, fp32_bytes or fp32_weight_bytes(shape), target, shape,
                                  artifact is None and streamable(model)).peak_bytes
    return FitReport(
        device=profile.name, target=target, quant=quant, context=context, weights_source=source,
        weights_mb=round(weights_total / mb, 1), kv_cache_mb=round(kv_per_token * context / mb, 1), kv_bits=kv_bits,
        activations_mb=round(act / mb, 1), prompt_tokens=chunk, runtime_overhead_mb=exporter.runtime_overhead_mb,
        total_mb=round(total / mb, 1), app_budget_mb=round(profile.app_budget_mb, 1),
        fits=total <= profile.app_budget_mb * mb, decode_bytes_per_token_mb=round((per_token_weights + kv_per_token * 64) / mb, 1),
        roofline_tok_s=round(short, 1), roofline_tok_s_full_context=round(full, 1),
        expected_decode_tok_s=round(expected_tok_s(short, shape.layers, profile), 1),
        expected_decode_tok_s_full_context=round(expected_tok_s(full, shape.layers, profile), 1), bound=bound,
        export_peak_mb=round(export_peak / mb, 1),
        notes=notes,
        weights=[{"name": w["name"], "mb": round(w["stored_bytes"] / mb, 3), "bits": w["bits"]} for w in weights])
