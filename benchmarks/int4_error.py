"""Where the ExecuTorch int4 .pte's error comes from, on SmolLM2-135M-Instruct, in PyTorch simulation.

    .venv/bin/python benchmarks/int4_error.py        # about 10 minutes on 2 cores

The model runs as the quantizer's own forward (quantize/calibration.py) on the evaluation passage
(2000 tokens, scored as benchmarks/quality.py scores: mean KL(fp32 || system) and top-1 over the first
512 positions, perplexity over all), with the weights the export packs (the .pte's codes, dequantized)
and activations rounded as the kernels round them (quantize/awq.round_activations: XNNPACK's per-token
int8 or onnxruntime's per-block-of-32). Promoted units (int8) are rounded per channel to nearest here,
where the export runs GPTQ on them: close, not identical. Prints one markdown row per variant.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slm_export.architectures import to_decoder  # noqa: E402
from slm_export.exporters import TARGETS  # noqa: E402
from slm_export.exporters.executorch.quant import dequantized_weights  # noqa: E402
from slm_export.loading import load  # noqa: E402
from slm_export.quantize.awq import round_activations  # noqa: E402
from slm_export.quantize.calibration import MAX_TOKENS, DecoderForward, calibration_text  # noqa: E402
from slm_export.quantize.methods import METHODS  # noqa: E402
from slm_export.quantize.mixed import promote, unit_sensitivity  # noqa: E402
from slm_export.quantize.plan import LM_HEAD, at_bits, decoder_weights  # noqa: E402
from slm_export.quantize.spec import QuantSpec, resolve_spec  # noqa: E402

KL_TOKENS, PPL_TOKENS = 512, 2000


class Rounded(DecoderForward):
    """The forward with each linear's input rounded as `rounding(weight name)` says."""

    def __init__(self, dec, weights, rounding):
        super().__init__(dec, weights)
        self.rounding = rounding

    def _round(self, x, name):
        r = self.rounding(name)
        return x if r == "none" else round_activations(x.reshape(-1, x.shape[-1]), r).view_as(x)

    def linear(self, x, lin):
        return super().linear(self._round(x, lin.sources[0]), lin)

    def logits(self, h, rows=None):
        return self._round(self.norm(h, self.dec.final_norm), LM_HEAD) @ self.weight(LM_HEAD).T


def main() -> int:
    torch.set_num_threads(2)
    loaded = load()
    dec = to_decoder(loaded.model, 2048)
    ids = loaded.tokenizer((HERE.parent / "slm_export" / "data" / "passage.txt").read_text())["input_ids"][:PPL_TOKENS]
    cal = loaded.tokenizer(calibration_text(), add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    run = lambda weights=None, rounding=lambda n: "none": Rounded(dec, weights, rounding)([ids])[0]  # noqa: E731
    ref = run()
    ref_lp = torch.log_softmax(ref[:KL_TOKENS].double(), -1)

    def row(name, weights=None, rounding=lambda n: "none"):
        lp = torch.log_softmax(run(weights, rounding).double(), -1)
        kl = float((ref_lp.exp() * (ref_lp - lp[:KL_TOKENS])).sum(-1).mean())
        top1 = float((ref_lp.argmax(-1) == lp[:KL_TOKENS].argmax(-1)).double().mean())
        ppl = math.exp(float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))
        print(f"| {name} | {kl:.4f} | {top1:.3f} | {ppl:.2f} |", flush=True)

    print("| variant | mean KL | top-1 | perplexity |\n|---|---|---|---|")
    per_token = lambda n: "per-token"  # noqa: E731
    row("fp32 weights, per-token int8 activations (XNNPACK)", None, per_token)
    row("fp32 weights, per-block-of-32 int8 activations (onnxruntime x86)", None, lambda n: "per-block")
    row("fp32 weights, per-token on the lm_head only", None, lambda n: "per-token" if n == LM_HEAD else "none")
    et = TARGETS.get("executorch")()
    plain = resolve_spec(et, QuantSpec(bits=4, lm_head_bits=4, mixed_precision=0.0))
    plan, codes = et.quantize(dec, plain, None, cal)
    w4 = dequantized_weights(plan, codes)
    row("int4 codes (plain .pte), float activations", w4)
    row("int4 codes (plain .pte), per-token activations", w4, per_token)
    row("int4 codes, lm_head fp32, float activations", {k: v for k, v in w4.items() if k != LM_HEAD})
    row("int4 codes, embedding fp32, per-token activations",
        {k: v for k, v in w4.items() if k != "model.embed_tokens.weight"}, per_token)

    # what XNNPACK's format changes, measured apart with round-to-nearest (int8 embedding rows)
    for name, changes in [("positive bfloat16 scales (XNNPACK)", {}), ("signed scales", dict(signed_scales=True)),
                          ("signed float32 scales", dict(signed_scales=True, scale_dtype={4: "float32"}))]:
        class Changed(type(et)):
            def limits(self, compute_precision=None, changes=changes):
                return dataclasses.replace(super().limits(compute_precision), **changes)
        ex = Changed()
        spec = resolve_spec(ex, QuantSpec(bits=4, method="rtn", lm_head_bits=4, mixed_precision=0.0, embedding_bits=8))
        row(f"rtn int4, {name}, float activations", dequantized_weights(*ex.quantize(dec, spec, None, None)))

    arrays = {n: a for n, _, a, _ in decoder_weights(dec)}
    head8 = et.plan(dec, resolve_spec(et, QuantSpec(bits=4, lm_head_bits=8, mixed_precision=0.0)), None)

    def int8(name):
        p = dataclasses.replace(at_bits(head8[name], 8, head8.limits), method="rtn")
        return METHODS.get("rtn")(np.asarray(arrays[name], dtype=np.float32), p).dequantize()

    sensitivity = unit_sensitivity(dec, head8, cal)
    for budget in (0.0, 0.05, 0.10, 0.15, 0.25):
        units = promote(head8, sensitivity, budget).calibration["mixed_precision"]["int8_units"] if budget else []
        names = {LM_HEAD} | {w.name for w in head8.weights if w.unit in units}
        weights = {**w4, **{n: int8(n) for n in names}}
        row(f"int8 lm_head + mixed {budget}, int8 linears on float activations", weights,
            lambda n: "none" if n in names else "per-token")
        row(f"int8 lm_head + mixed {budget}, int8 linears as 8da8w", weights, per_token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
