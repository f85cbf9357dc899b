"""The export pipeline: load -> describe -> quantize + write (per target) -> tokenizer -> manifest.

Everything is written into a temporary folder beside the destination and renamed into place at
the end, so an interrupted export never leaves a folder that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

from . import manifest as mf
from . import progress
from .architectures import check_min_context, to_decoder
from .errors import OutOfMemory, SlmExportError
from .exporters import TARGETS, ExportOptions
from .fit import shape_before_loading
from .loading import DEFAULT_MODEL, LoadedModel, check_tokenizer, from_object, gguf_parsed_once, load, streamable
from .memory import (available_memory, check_memory, estimate_export, estimate_for_target,
                     fp32_weight_bytes, is_out_of_memory, out_of_memory)
from .quantize import QuantSpec
from .quantize.calibration import MAX_TOKENS
from .quantize.spec import quant_label, resolve_spec
from .quantize.methods import CALIBRATED, EQUALIZING
from .sources import model_record
from .staging import check_destination, check_free_space, drop_note, staged_folder, write_note

REPORT_FILE = "quant_report.json"


def run_export(model, *, target: str = "onnx", spec: QuantSpec | None = None, out: str | Path | None = None,
               force: bool = False, max_context: int | None = None, compute_precision: str | None = None,
               kv_bits: int | None = None, calibration_text: str | Path | None = None, tokenizer=None,
               no_tokenizer: bool = False, trust_remote_code: bool = False, skip_memory_check: bool = False,
               log=print):
    """Export `model` (a path, hub id, None for the default, or an nn.Module); returns the folder written.

    no_tokenizer: export without the model's tokenizer (a model folder without tokenizer files is
    refused otherwise); generate then cannot run, verify and bench use random token ids.
    skip_memory_check: export even where the estimated peak memory exceeds what this machine has."""
    exporter = TARGETS.get(target)()
    asked = spec or QuantSpec()
    spec = resolve_spec(exporter, spec)
    precision, kv_bits = exporter.resolve_precision(compute_precision, kv_bits)
    if spec.quantized and spec.activations == "int8" and not exporter.quantizes_activations:
        # int8 activations are "where the target can": this one cannot, so the label says weight-only
        log(f"note: the {target} target quantizes weights only; activations stay "
            f"{compute_precision or exporter.compute_precisions[0]}")
        spec = dataclasses.replace(spec, activations="float")
    label = quant_label(spec, precision)
    suffix = f"-{precision}" if precision != exporter.compute_precisions[0] and spec.quantized else ""
    out = Path(out or f"{target}-{label}{suffix}").expanduser().absolute()
    check_destination(out, force)
    check_min_context(max_context)
    exporter.check(spec, precision)  # what this target cannot do is said before the model loads
    method = method_of(exporter, spec)
    reads_text = calibrates(exporter, spec, kv_bits)
    user_text = _read_calibration_text(calibration_text, reads_text, target, kv_bits, method)  # before the model loads
    _check_tokenizer_options(tokenizer, no_tokenizer, calibration_text)
    _check_text_for(spec.method, tokenizer_present=not no_tokenizer, why="--no-tokenizer")

    # Memory and disk, before the model loads: from its config where it can be read without the weights
    budget = _Budget(f"exporting {_model_name(model)} to {target} {_short_quant(spec, precision)}",
                     exporter, asked, spec, kv_bits, skip_memory_check)
    try:
        with contextlib.ExitStack() as parse:
            parse.enter_context(gguf_parsed_once())  # a GGUF's config (read here) and its load share one parse
            shape = shape_before_loading(model, trust_remote_code)
            if shape is not None:
                check_free_space(out, _artifact_bytes(shape, spec, exporter, precision), budget.what)
                budget.check(fp32_weight_bytes(shape), shape, streamable(model))
            t0 = time.perf_counter()
            with staged_folder(out, log=log, note=budget.note()) as tmp:
                summary = _export_into(tmp, model, exporter, spec, precision, kv_bits, label, max_context,
                                       calibration_text, user_text, reads_text, tokenizer, no_tokenizer,
                                       trust_remote_code, budget, parse.close, log)
    except BaseException as e:
        if not isinstance(e, OutOfMemory) and is_out_of_memory(e):
            raise out_of_memory(budget.estimate, budget.have) from None
        raise
    log(summary)
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out


def _export_into(tmp, model, exporter, spec, precision, kv_bits, label, max_context, calibration_text,
                 user_text, reads_text, tokenizer, no_tokenizer, trust_remote_code, budget, loaded_hook, log) -> str:
    """Load, quantize and write into the staged folder `tmp` (renamed into place after this returns);
    returns the quant report's summary. `loaded_hook()` runs once the model is loaded."""
    t0 = time.perf_counter()
    with progress.stage(f"loading {_model_name(model)}"):
        loaded = model if isinstance(model, LoadedModel) else (
            load(model, trust_remote_code=trust_remote_code, tokenizer=not no_tokenizer, stream=True)
            if model is None or isinstance(model, (str, os.PathLike)) else from_object(model, tokenizer))
    loaded_hook()  # the parsed GGUF is not needed past here
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    if no_tokenizer:
        loaded.tokenizer = None
    check_tokenizer(loaded.tokenizer, mf.source_label(loaded.source))
    _check_text_for(spec.method, tokenizer_present=loaded.tokenizer is not None, why="this model has no tokenizer")
    log(f"loaded {mf.source_label(loaded.source)} "
        f"({loaded.model.config.model_type if hasattr(loaded.model, 'config') else type(loaded.model).__name__}) "
        f"in {time.perf_counter() - t0:.1f}s")
    if budget.estimate is None:  # its config could not be read before loading: its weights are counted now
        budget.check(4 * sum(p.numel() for p in loaded.model.parameters()))
        write_note(tmp, budget.note())
    if max_context is None:
        limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or 2048
        max_context = min(2048, limit)
    decoder = to_decoder(loaded.model, max_context)
    if decoder.streamed and not streams(exporter, spec):  # every weight read into memory first
        with progress.stage("reading the weights"):
            decoder = decoder.materialized()
    exporter.check_model(decoder, precision)  # what this target's runtime cannot run, before any quantization
    spec = _default_method_that_runs(exporter, spec, decoder, loaded.tokenizer is not None, log)
    # only an export that calibrates (GPTQ, static KV scales) reads text: tokenizing is wasted work elsewhere
    text = _calibration_ids(loaded.tokenizer, calibration_text, user_text) if reads_text else {}
    bos, eos = _special_ids(loaded)
    options = ExportOptions(max_context=max_context, compute_precision=precision, kv_bits=kv_bits,
                            bos_token_id=bos, eos_token_ids=tuple(eos), model_name=_model_id(loaded.source), **text)

    t1 = time.perf_counter()
    ids = options.calibration(MAX_TOKENS, decoder.vocab_size) if reads_text else None
    plan, codes = exporter.quantize(decoder, spec, precision, ids[0] if ids else None)
    if plan.calibration:
        plan.calibration.update(text=ids[1], **(options.text_record or {"random_ids": len(ids[0])}))
    if codes:
        log(f"quantized {len(codes)} weights in {time.perf_counter() - t1:.1f}s"
            + (f" (calibrated on {plan.calibration['text']})" if plan.calibration else ""))
    with progress.stage(f"writing the {exporter.name} program ({exporter.runtime})"):
        result = exporter.write(decoder, spec, tmp, options, plan, codes)
    export_s = time.perf_counter() - t1
    result.report.write(tmp / REPORT_FILE)
    tok_info, generation = _save_tokenizer(loaded, tmp)
    manifest = {
        "target": exporter.name,
        "runtime": result.runtime or exporter.runtime,
        "model_file": result.model_file,
        "target_extra": result.extra,
        "source": model_record(loaded.source),  # its name and sha256, not its path
        "architecture": decoder.architecture,
        "model": {
            "layers": decoder.num_layers, "hidden_size": decoder.hidden_size, "heads": decoder.num_heads,
            "kv_heads": decoder.num_kv_heads, "head_dim": decoder.head_dim, "vocab_size": decoder.vocab_size,
            "tied_embeddings": decoder.tied_embeddings,
            "parameters": int(sum(e.float_bytes for e in result.report.entries) // 4),
        },
        "max_context": max_context,
        "quant": {"spec": spec.to_dict(), "label": label, "report": REPORT_FILE,
                  "methods": sorted({w.method for w in plan.weights if w.quantized}),
                  "calibration": plan.calibration or None,
                  "summary": result.report.summary()},
        "io": result.io,
        "tokenizer": tok_info,
        "generation": generation,
        "export_seconds": round(export_s, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": mf.library_versions("torch", "transformers", *exporter.packages),
    }
    manifest["app_runtimes"] = exporter.app_runtime_files(tmp, manifest)  # e.g. onnxruntime-genai's config
    drop_note(tmp)  # before the manifest lists the folder's files
    mf.write(tmp, manifest)
    return result.report.format_summary()


def _model_id(source: dict) -> str:
    """The source's hub id (org/name), else its short name or its file's or folder's base name."""
    if source.get("kind") == "hub":
        return source["id"]
    return source.get("name") or Path(source.get("path") or "model").name


def method_of(exporter, spec: QuantSpec) -> str | None:
    """The quantization method the resolved `spec` runs on this target (None: not quantized)."""
    return (spec.method or exporter.default_method(spec.bits, spec.symmetric)) if spec.quantized else None


def streams(exporter, spec: QuantSpec) -> bool:
    """Whether an export reads a checkpoint's weights one at a time when used (slm_export/stored.py):
    its writer reads them so (awq's rescaling is applied as each weight is read)."""
    return exporter.streams(spec)


def calibrates(exporter, spec: QuantSpec, kv_bits: int) -> bool:
    """Whether exporting under the resolved `spec` runs text through the model (GPTQ, mixed precision,
    static KV-cache scales)."""
    method = method_of(exporter, spec)
    return method in CALIBRATED or bool(spec.mixed_precision) or exporter.calibrates(kv_bits)


# ---------------------------------------------------------------- memory and disk, before the work

def _model_name(model) -> str:
    if isinstance(model, LoadedModel):
        return mf.source_label(model.source)
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _short_quant(spec: QuantSpec, precision: str) -> str:
    return f"int{spec.bits}" if spec.quantized else ("float16" if precision == "float16" else "float")


def _artifact_bytes(shape, spec: QuantSpec, exporter, precision: str) -> int:
    """At least what the artifact's weights take on disk (without mixed precision's extra int8: a
    lower bound, so a refusal on it is never wrong)."""
    from .fit import estimate_weight_bytes

    try:
        return sum(w["stored_bytes"] for w in
                   estimate_weight_bytes(shape, dataclasses.replace(spec, mixed_precision=0.0), exporter, precision))
    except Exception:  # noqa: BLE001 - shapes the exporter would refuse (an unsupported family): loading says so
        return 0


@dataclasses.dataclass
class _Budget:
    """An export's memory: its estimate, what the machine had, and the refusal when it cannot hold it."""

    what: str  # "exporting MODEL to TARGET int4"
    exporter: object
    asked: QuantSpec  # the spec as given (other targets resolve it with their own defaults)
    spec: QuantSpec
    kv_bits: int
    skip: bool
    estimate: object = None  # memory.ExportEstimate, once the model's size is known
    have: object = None  # memory.Available when it was checked

    def check(self, fp32_bytes: int, shape=None, from_checkpoint: bool = False) -> None:
        """Refuse (one line, exit 2) when this machine cannot hold the export's peak, unless skipped."""
        self.estimate = estimate_export(self.exporter, self.spec, self.kv_bits, fp32_bytes, self.what, shape,
                                        from_checkpoint)
        self.have = available_memory() if self.skip else check_memory(
            self.estimate, lambda name: estimate_for_target(name, self.asked, fp32_bytes, shape, from_checkpoint))

    def note(self) -> dict | None:
        """What a killed export's partial folder tells the run that sweeps it (staging.RUN_NOTE)."""
        if self.estimate is None:
            return None
        return {"what": self.what, "peak_bytes": self.estimate.peak_bytes, "available": self.have.describe()}


MIN_CALIBRATION_TOKENS = 32


def _read_calibration_text(path, reads_text: bool, target: str, kv_bits: int, method: str | None) -> str | None:
    """The --calibration-text file's text, refused before anything loads if it cannot be used."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if not reads_text:
        raise SlmExportError(f"--calibration-text is for exports that calibrate: --quant-method "
                             f"{' or '.join(sorted(CALIBRATED))}, or --target onnx --kv-bits 8; this {target} export "
                             f"({method or 'no quantization'}, --kv-bits {kv_bits}) calibrates nothing")
    if not path.is_file():
        raise SlmExportError(f"--calibration-text {path} is not a file; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlmExportError(f"--calibration-text {path} could not be read as UTF-8 text: {e}") from None
    if not text.strip():
        raise SlmExportError(f"--calibration-text {path} is empty; pass at least {MIN_CALIBRATION_TOKENS} tokens "
                             f"of text like your users' (up to {MAX_TOKENS} are used)")
    return text


def _default_method_that_runs(exporter, spec: QuantSpec, decoder, tokenizer_present: bool, log) -> QuantSpec:
    """`spec`, with gptq named where the target's default is awq and this model cannot take it (no text to
    choose the scales on, or norms awq cannot rescale): the manifest then records what ran."""
    if spec.method is not None or method_of(exporter, spec) not in EQUALIZING:
        return spec
    from .quantize.awq import cannot_rescale

    why = cannot_rescale(decoder) if tokenizer_present else "the model has no tokenizer to read calibration text"
    if why is None:
        return spec
    log(f"note: {why}; quantizing with gptq instead of awq (the {exporter.name} default at --bits {spec.bits})")
    return dataclasses.replace(spec, method="gptq")


def _check_text_for(method: str | None, tokenizer_present: bool, why: str) -> None:
    """Refuse awq without text to choose its scales on (GPTQ falls back to random token ids; AWQ's
    scales would then follow no real activations). `method`: the one asked for (a default falls back)."""
    if method in EQUALIZING and not tokenizer_present:
        raise SlmExportError(f"--quant-method {method} chooses its scales on calibration text, which needs the "
                             f"model's tokenizer ({why}); use --quant-method gptq, or export with the tokenizer")


def _check_tokenizer_options(tokenizer, no_tokenizer: bool, calibration_text) -> None:
    if no_tokenizer and tokenizer is not None:
        raise SlmExportError("no_tokenizer=True and a tokenizer were both given; pass one or the other")
    if no_tokenizer and calibration_text is not None:
        raise SlmExportError("--calibration-text needs the model's tokenizer; drop --no-tokenizer or --calibration-text")


def _calibration_ids(tokenizer, path, user_text: str | None) -> dict:
    """ExportOptions' text_ids (and text_source): the user's text or the shipped calibration passage, tokenized."""
    from .quantize.calibration import calibration_text

    if user_text is not None and tokenizer is None:
        raise SlmExportError("--calibration-text needs the model's tokenizer; this model has none")
    if tokenizer is None:
        return {}  # the exporter calibrates on random ids and says so in the manifest
    from .sources import text_record, text_sha256

    text = calibration_text() if user_text is None else user_text
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    # the shipped passage is known by its sha256; the user's file by its name and sha256 (not its path)
    record = {"file": None, "sha256": text_sha256(text)} if user_text is None else text_record(path, text)
    if user_text is None:
        return {"text_ids": ids, "text_record": record}
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise SlmExportError(f"--calibration-text {path} is {len(ids)} tokens; calibration needs at least "
                             f"{MIN_CALIBRATION_TOKENS} (up to {MAX_TOKENS} are used)")
    return {"text_ids": ids, "text_source": f"{Path(path).name} (--calibration-text)", "text_record": record}


def _special_ids(loaded: LoadedModel) -> tuple[int | None, list[int]]:
    """(the BOS id or None, the sorted stop ids): the tokenizer's BOS, else the generation config's; the
    generation config's EOS ids and the tokenizer's."""
    tok = loaded.tokenizer
    gen = getattr(loaded.model, "generation_config", None)
    eos = set()
    if gen is not None:
        e = gen.eos_token_id
        eos.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    if tok is not None and tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        bos = getattr(gen, "bos_token_id", None)
    return (int(bos) if isinstance(bos, int) else None), sorted(int(i) for i in eos)


# The sampling settings generation_config.json always states, so an app reading it needs no library's
# defaults: the model's own where it suggests them, else these (greedy, as `generate` and `verify` run).
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def _save_tokenizer(loaded: LoadedModel, folder: Path) -> tuple[dict, dict]:
    """(the manifest's tokenizer record, its generation record); writes the tokenizer files and
    generation_config.json (without sampling defaults) into `folder`."""
    tok = loaded.tokenizer
    gen = getattr(loaded.model, "generation_config", None)
    generation = _save_generation_config(gen, folder) if gen is not None else {}
    bos_id, eos = _special_ids(loaded)
    if tok is None:
        return {"present": False, "eos_token_ids": eos}, generation
    tok.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise SlmExportError("the tokenizer has no fast (tokenizer.json) form; slm-export needs a fast tokenizer")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else getattr(gen, "pad_token_id", None)
    return {
        "present": True,
        "file": "tokenizer.json",
        "chat_template": getattr(tok, "chat_template", None),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "eos_token_ids": eos,
        "bos_token_id": bos_id,
        "pad_token_id": pad_id if isinstance(pad_id, int) else None,
    }, generation


def _save_generation_config(gen, folder: Path) -> dict:
    """Write `gen` with every sampling setting stated (the model's, else SAMPLING_DEFAULTS); returns them."""
    import json

    saved = gen.to_diff_dict()  # what the model sets, as transformers writes it
    from_model = sorted(k for k in SAMPLING_DEFAULTS if k in saved)
    sampling = {k: saved.get(k, default) for k, default in SAMPLING_DEFAULTS.items()}
    saved.update(sampling)
    (folder / "generation_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return {"sampling": sampling, "from_model": from_model}
