"""The quantization an artifact was exported with, run again from its manifest (for `verify`).

Every method is deterministic for a given weight and calibration text, so the recorded spec, the
target's limits and the recorded calibration text give back the codes the export packed. verify's
weight checks compare each file's stored codes with these exactly, and ExecuTorch builds its
same-quant reference from them.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..errors import SlmExportError


def recorded_calibration_ids(folder: Path, manifest: dict, vocab_size: int) -> list[int]:
    """The calibration token ids an export used, from what its manifest recorded."""
    import numpy as np

    from ..sources import find_text, text_sha256
    from ..text import TextCodec
    from .calibration import MAX_TOKENS, calibration_text

    cal = manifest["quant"].get("calibration") or {}
    if cal.get("random_ids"):  # the model had no tokenizer: ExportOptions.calibration's ids
        return np.random.default_rng(0).integers(0, vocab_size, cal["random_ids"]).tolist()
    if cal.get("file") is not None:  # the user's text: found where this machine read it, or verify --calibration-text
        return TextCodec(Path(folder), manifest).encode(find_text(cal), add_special_tokens=False)[:MAX_TOKENS]
    text = calibration_text()
    if text_sha256(text) != cal.get("sha256", text_sha256(text)):
        raise SlmExportError("the shipped calibration passage differs from the one this artifact was exported with; "
                             "re-export it with this version of slm-export")
    return TextCodec(Path(folder), manifest).encode(text, add_special_tokens=False)[:MAX_TOKENS]


# verify asks for the same re-quantization twice (the weight check and, where the files cannot be read
# back, the same-quant reference): within `reused()`, the last one is kept for the same model and folder.
_reuse: dict = {"on": 0, "last": None}


@contextmanager
def reused():
    """Within this block, requantize() of the same model object and artifact runs once."""
    _reuse["on"] += 1
    try:
        yield
    finally:
        _reuse["on"] -= 1
        if not _reuse["on"]:
            _reuse["last"] = None


def source_decoder(model, max_context: int):
    """The `Decoder` an export makes of `model` (a transformers model, or a plain module of custom.py's contract)."""
    from ..architectures import to_decoder
    from ..custom import as_transformers_llama, is_plain_module

    return to_decoder(as_transformers_llama(model) if is_plain_module(model) else model, max_context)


def requantize(exporter, model, folder: Path, manifest: dict):
    """(plan, codes, decoder) of the artifact in `folder`, quantized again from `model` (its source);
    `decoder` is the model as the export wrote it (an awq export's rescaled norms and weights)."""
    from .spec import QuantSpec

    key = (exporter.name, str(Path(folder).resolve()), json.dumps(manifest["quant"], sort_keys=True, default=str))
    last = _reuse["last"]
    if _reuse["on"] and last is not None and last[0] is model and last[1] == key:
        return last[2]
    spec = QuantSpec.from_dict(manifest["quant"]["spec"])
    precision = manifest.get("target_extra", {}).get("compute_precision")
    dec = source_decoder(model, manifest["max_context"])
    cal = manifest["quant"].get("calibration") or {}
    units = (cal.get("mixed_precision") or {}).get("int8_units")  # as the export measured them
    alphas = (cal.get("awq") or {}).get("alphas")  # as the export chose them
    plan = exporter.plan(dec, spec, precision)
    ids = recorded_calibration_ids(Path(folder), manifest, dec.vocab_size) if plan.calibrated else None
    plan, codes = exporter.quantize(dec, spec, precision, ids, int8_units=units if spec.mixed_precision else None,
                                    awq_alphas=alphas)
    out = (plan, codes, dec)
    if _reuse["on"]:
        _reuse["last"] = (model, key, out)
    return out
