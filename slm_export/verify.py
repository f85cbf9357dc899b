"""`slm-export verify`: parity of an artifact against PyTorch, through the KV cache.

On the same real text the artifact and PyTorch see a prompt (all positions compared) and then N
decode steps, fed one token at a time through the artifact's KV cache with PyTorch's greedy
tokens (teacher forcing, so a single early miss does not hide later agreement). Metrics: max abs
logit difference, mean KL(PyTorch || artifact), top-1 agreement, and the greedy match length (the
decode steps before the first disagreement = how long free-running greedy outputs stay equal).

top-1 agreement counts only the positions where the reference's own top-1 leads its runner-up by more
than the bounds let an artifact undo (`Tolerance.margin`); the report says how many those were.

Before the logits, the target's checks of its files (`package_checks`): each target reads its stored
weights back and requires exactly the codes and scales of the reference quantized again with the
recorded plan (quantize/replay.py), naming the first tensor that differs; they join the verdict.

Two references:
  fp32       the original model. Tolerances allow for the quantization error itself.
  same-quant the original model with the artifact's own (dequantized) weights loaded into it, so
             what remains is the exporter's and runtime's error (graph, kernels, int8 activations).
             Each target supplies those weights (`same_quant_weights`): ONNX and Core ML read them back
             out of the file; ExecuTorch re-runs its export's quantization (which its weight check
             has found in the .pte).
Perplexity on the shipped passage is reported for the artifact and for PyTorch fp32.

Where a runtime cannot execute on this machine (Core ML off macOS), the target's stand-in runs
instead (for Core ML: the converted PyTorch program with the package's weights), the report says
so (`not_executed`, `executed_by`), and the target's static checks of its files join the verdict.

With `device` (`sim:PROFILE` for an ARM profile), the artifact runs on that device's real runtime
build (under emulation: devices/emulation.py) through the same steps, and a third comparison is
added: the device's logits against this machine's run of the same artifact. Perplexity stays on this
machine's run (labelled so).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from . import progress
from .errors import ParityFailure, SlmExportError
from .text import passage_ids


@dataclass(frozen=True)
class Tolerance:
    mean_kl: float
    top1: float  # minimum agreement, over the positions where PyTorch's top-1 leads by more than `margin`
    max_abs: float | None = None  # only meaningful when nothing is quantized
    top1_margin: float | None = None  # None: derived from the bounds (`margin`)

    @property
    def margin(self) -> float:
        """The lead (in logits) PyTorch's top-1 must have over its runner-up for top-1 agreement to be
        judged at a position.

        Top-1 agreement at a near-tie says which way noise fell, not whether the artifact is faithful:
        random-weight models have near-flat logits, and faithful exports failed on it (a Core ML int8
        package at KL 0.00002 against fp32 scored top-1 0.855 < 0.88; an ONNX int4 export at KL 0.002
        scored 0.384 < 0.40). So a position counts only where the reference's lead is more than an
        artifact within these bounds could undo. For a small logit error d, KL(p || q) ~ Var_p(d) / 2, so
        an artifact at the KL bound moves a logit by about sqrt(2 KL), and the gap between two logits by
        about twice that: leads below 2 sqrt(2 KL) can flip within the bound (int8 0.49, int4 against
        fp32 2.4 logits). Where a max |dlogit| bound holds, no lead above 2 max_abs can flip, so that is
        a floor. An artifact well inside its KL bound moves logits by far less than the margin, so it
        does not fail on near-ties; a broken one still disagrees where the reference is sure.
        """
        if self.top1_margin is not None:
            return self.top1_margin
        m = 2 * math.sqrt(2 * self.mean_kl)
        return max(m, 2 * self.max_abs) if self.max_abs is not None else m


# Why these numbers (measured on SmolLM2-135M-Instruct, 128 prompt + 32 decode positions of the
# shipped passage, and on tiny random models; docs/parity.md "Parity tolerances"):
#  - bits 16: the same math in fp32, only summation order differs (measured max |dlogit| 1e-4, so KL
#    about 1e-9). The KL bound is set so that it alone fails a 1% change of any one weight tensor: on
#    SmolLM2-135M, every layer's q/k/v/o/gate/up/down and both norms x1.01 in turn (270 changes) gave
#    KL 1.5e-6 (layer 28's q or k) to 1.2e-3, one layer's down_proj at least 8.2e-6.
#  - int8 / int4 against same-quant: identical weights; what is left is int8 activation rounding
#    (MatMulNBits accuracy_level 4) and kernel order (measured KL 0.004, top-1 0.96).
#  - against fp32: the quantization error itself. int8 costs little (KL 0.006, top-1 0.94). int4 g32
#    costs a 135M model a lot (ONNX with its scale search KL 0.42, top-1 0.58, perplexity 28.1 ->
#    36.5; round-to-nearest KL 0.5), so that bound only catches a broken export; the same-quant bound
#    is the tight gate.
TOLERANCES: dict[int, dict[str, Tolerance]] = {
    16: {"fp32": Tolerance(mean_kl=1e-6, top1=0.99, max_abs=1e-2)},
    8: {"same-quant": Tolerance(mean_kl=0.01, top1=0.92), "fp32": Tolerance(mean_kl=0.03, top1=0.88)},
    4: {"same-quant": Tolerance(mean_kl=0.03, top1=0.90), "fp32": Tolerance(mean_kl=0.75, top1=0.40)},
}

# Kernels that quantize activations per token (one int8 scale per row of `hidden` values: XNNPACK's
# 8da4w / 8da8w, and onnxruntime's KleidiAI kernels on ARM) round more than onnxruntime's x86 kernels,
# which use one scale per block of 32, so against same-quant (float activations) they carry more
# activation rounding. Measured on SmolLM2-135M-Instruct (docs/parity.md "Parity tolerances"): a .pte's same-quant
# KL 0.022 / top-1 0.92 (int8), 0.036 / 0.87 (int4); the same .onnx on ARM under QEMU, int4 same-quant KL
# 0.031 / top-1 0.87 (x86: 0.004 / 0.96); against fp32 at int8, KL 0.028 / top-1 0.90 (over half of the
# shared bound, so widened). Keyed by the kernels' declared `activation_rounding` (quantize/limits.py).
ACTIVATION_ROUNDING_TOLERANCES: dict[str, dict[int, dict[str, Tolerance]]] = {
    "per-token": {8: {"same-quant": Tolerance(mean_kl=0.04, top1=0.84), "fp32": Tolerance(mean_kl=0.05, top1=0.84)},
                  4: {"same-quant": Tolerance(mean_kl=0.06, top1=0.82)}},
}

# A float16 program (Core ML's default compute precision; ExecuTorch --compute-precision float16):
# float16 activations and KV cache against fp32 PyTorch is what remains at bits 16. Measured on
# SmolLM2-135M-Instruct: ExecuTorch fp16 KL 0.00003, top-1 0.994, max |dlogit| 0.15, perplexity equal
# to fp32's; Core ML's converted program alike (docs/parity.md "Parity tolerances").
FLOAT16_TOLERANCES: dict[int, dict[str, Tolerance]] = {16: {"fp32": Tolerance(mean_kl=1e-3, top1=0.95)}}

# A float16 KV cache in an fp32 program (Core ML's cache at --compute-precision float32; ExecuTorch --kv-bits 16)
# rounds every cached key and value: at bits 16 its bound stays where it was before the fp32 one was tightened
# (not measured on the real model); the weight checks, not KL, catch a changed weight there.
FLOAT16_CACHE_TOLERANCES: dict[int, dict[str, Tolerance]] = {16: {"fp32": Tolerance(mean_kl=1e-4, top1=0.99, max_abs=1e-2)}}

# The device's run against this machine's run of the same artifact (the third comparison of
# `verify --device`), by weight bits and activation kind. Measured on SmolLM2-135M-Instruct (ARM vs x86):
# fp32 max |dlogit| 1e-4; int8 weights KL 0.004 / top-1 0.97; int4 KL 0.034 / top-1 0.85.
HOST_TOLERANCES: dict = {"float": Tolerance(mean_kl=1e-5, top1=0.99, max_abs=1e-3),  # fp32 or float activations
                   8: Tolerance(mean_kl=0.01, top1=0.92), 4: Tolerance(mean_kl=0.06, top1=0.80)}


def host_tolerance(bits: int, activations: str) -> Tolerance:
    return HOST_TOLERANCES["float" if bits == 16 or activations == "float" else bits]


# An int8 KV cache (--kv-bits 8) rounds every cached key and value: its error adds to whatever the
# weights cost, so it is an allowance on top of each bound (more KL, fewer top-1 matches, and no
# max |dlogit| bound: nothing is exact any more). Measured on SmolLM2-135M-Instruct (docs/parity.md
# "Parity tolerances"): ONNX's static per-channel scales against the same weights with an fp32 cache
# KL 0.0066 / top-1 0.95 (first 512 tokens); ExecuTorch's per-row scales lose less.
KV_CACHE_ALLOWANCE: dict[int, tuple[float, float]] = {8: (0.02, 0.06)}  # bits: (added mean KL, top-1 drop)


def tolerances_for(bits: int, activation_rounding: str = "per-block", compute_precision: str = "float32",
                   kv_bits: int = 32) -> dict[str, Tolerance]:
    """The bounds for an artifact from what its kernels do: the shared ones, widened for activations
    rounded per token, for a float16 KV cache and for a float16 program, each widened by its KV cache's allowance."""
    merged = dict(TOLERANCES[bits])
    merged.update(ACTIVATION_ROUNDING_TOLERANCES.get(activation_rounding, {}).get(bits, {}))
    if kv_bits == 16:
        merged.update(FLOAT16_CACHE_TOLERANCES.get(bits, {}))
    if compute_precision == "float16":
        merged.update(FLOAT16_TOLERANCES.get(bits, {}))
    if kv_bits in KV_CACHE_ALLOWANCE:
        kl, drop = KV_CACHE_ALLOWANCE[kv_bits]
        merged = {name: Tolerance(mean_kl=t.mean_kl + kl, top1=t.top1 - drop) for name, t in merged.items()}
    return merged


def artifact_tolerances(manifest: dict, on_arm: bool = False) -> dict[str, Tolerance]:
    """tolerances_for an exported artifact: its target's declared activation rounding (none with float
    activations; per token on ARM, whose int8 kernels quantize activations per row)."""
    from .exporters import TARGETS

    spec, extra = manifest["quant"]["spec"], manifest.get("target_extra", {})
    precision, kv_bits = extra.get("compute_precision", "float32"), extra.get("kv_bits")
    if kv_bits is None:  # Core ML records no --kv-bits: its cache is a float16 state
        kv_bits = 16 if manifest.get("io", {}).get("kv_layout", {}).get("dtype") == "float16" else 32
    rounding = TARGETS.get(manifest["target"])().limits(precision).activation_rounding
    if spec.get("activations") == "float":
        rounding = "none"
    elif on_arm and rounding == "per-block":
        rounding = "per-token"
    return tolerances_for(spec["bits"], rounding, precision, kv_bits)


@dataclass
class Comparison:
    reference: str
    positions: int
    max_abs_logit_diff: float
    mean_kl: float
    top1_agreement: float | None  # over the judged positions; None when no position was judged
    greedy_match_tokens: int
    decode_steps: int
    tolerance: dict
    passed: bool
    top1_judged: int = 0  # positions where the reference's top-1 leads its runner-up by more than top1_margin
    top1_margin: float = 0.0
    top1_all: float = 0.0  # agreement over all positions (informative: near-ties included)

    def top1_line(self) -> str:
        got = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.3f}"
        return (f"{self.reference}: top-1 {got} over {self.top1_judged} of {self.positions} positions "
                f"(margin > {self.top1_margin:.3g}; {self.top1_all:.3f} over all)")


@dataclass
class ParityReport:
    artifact: str
    target: str
    quant: str
    prompt_tokens: int
    decode_steps: int
    comparisons: list[Comparison] = field(default_factory=list)
    perplexity: dict = field(default_factory=dict)
    executed_by: str = ""  # the runtime, or the stand-in where the runtime cannot execute here
    device: str = "local"  # where the artifact ran (sim:PROFILE: its ARM runtime under emulation)
    not_executed: str = ""  # why the runtime did not run (Core ML off macOS), else empty
    checks: list[dict] = field(default_factory=list)  # the target's static checks of its files
    prompt: str = "the shipped passage"  # or random token ids (an artifact without a tokenizer)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and all(c["passed"] for c in self.checks)

    def to_dict(self) -> dict:
        return dict(asdict(self), passed=self.passed)

    def format(self) -> str:
        lines = [f"parity of {self.artifact} ({self.target}, {self.quant}): {self.prompt_tokens} prompt tokens + "
                 f"{self.decode_steps} decode steps"]
        if self.not_executed:
            lines.append(f"  not executed: {self.not_executed}")
        if self.prompt == RANDOM_PROMPT:
            lines.append(f"  prompt: {self.prompt}")
        if self.executed_by:
            lines.append(f"  executed by: {self.executed_by}")
        for c in self.checks:
            lines.append(f"  check: {c['name']}: {'PASS' if c['passed'] else 'FAIL'} ({c['detail']})")
        lines.append(f"  {'reference':<11} {'max|dlogit|':>11} {'mean KL':>9} {'top-1':>7} {'greedy match':>13}  result")
        for c in self.comparisons:
            t = c.tolerance
            bound = f"KL<={t['mean_kl']:g}, top-1>={t['top1']:g}" + (f", max<={t['max_abs']:g}" if t.get("max_abs") else "")
            top1 = "n/a" if c.top1_agreement is None else f"{c.top1_agreement:.3f}"
            lines.append(f"  {c.reference:<11} {c.max_abs_logit_diff:>11.4f} {c.mean_kl:>9.5f} {top1:>7} "
                         f"{c.greedy_match_tokens:>6}/{c.decode_steps:<6}  {'PASS' if c.passed else 'FAIL'} ({bound})")
        # top-1 counts only where PyTorch's own lead is more than the bounds let an artifact undo (Tolerance.margin)
        lines += [f"  {c.top1_line()}" for c in self.comparisons]
        if self.perplexity:
            p = self.perplexity
            where = " (this machine's run)" if self.device != "local" else ""
            lines.append(f"  perplexity on {p['tokens']} tokens of the shipped passage: artifact{where} {p['artifact']:.3f}, "
                         f"PyTorch fp32 {p['pytorch_fp32']:.3f}")
        return "\n".join(lines)


def first_passage_ids(codec, n: int) -> list[int]:
    ids = passage_ids(codec)
    if len(ids) < n:
        raise SlmExportError(f"--prompt-tokens {n} is more than the shipped passage's {len(ids)} tokens; "
                             f"use at most {len(ids)}")
    return ids[:n]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_leads(ref_logits: np.ndarray) -> np.ndarray:
    """Per position, how far the reference's top-1 logit is above its runner-up."""
    top2 = np.partition(ref_logits.astype(np.float64), -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def compare(ref_logits: np.ndarray, art_logits: np.ndarray, n_decode: int, name: str, tol: Tolerance) -> Comparison:
    lp, lq = _log_softmax(ref_logits), _log_softmax(art_logits)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    agree = ref_logits.argmax(-1) == art_logits.argmax(-1)
    dec = agree[-n_decode:] if n_decode else agree[:0]
    match = int(np.argmin(dec)) if not dec.all() else len(dec)
    max_abs = float(np.abs(ref_logits - art_logits).max())
    # top-1 is judged where the reference is sure enough for it to mean something (Tolerance.margin)
    margin = tol.margin
    judged = reference_leads(ref_logits) > margin
    top1 = float(agree[judged].mean()) if judged.any() else None
    ok = (kl <= tol.mean_kl and (top1 is None or top1 >= tol.top1)
          and (tol.max_abs is None or max_abs <= tol.max_abs))
    return Comparison(name, len(agree), max_abs, kl, top1, match, n_decode, asdict(tol) | {"top1_margin": margin}, ok,
                      top1_judged=int(judged.sum()), top1_margin=margin, top1_all=float(agree.mean()))


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]))
        return getattr(out, "logits", out)[0].float().numpy()


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    from .custom import is_plain_module

    if is_plain_module(model):  # no KV-cache API in the contract: recompute the whole sequence
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(_torch_logits(model, ids)[-1].argmax()))
        return ids[len(prompt):]
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, tok, toks = out.past_key_values, int(out.logits[0, -1].argmax()), []
        for _ in range(n):
            toks.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    return toks


def logits_steps(prompt: list[int], forced: list[int]) -> list[dict]:
    """The prompt in one pass (all logits), then the forced tokens one at a time through the cache."""
    return ([{"reset": len(prompt) + len(forced)}, {"forward": prompt, "all_logits": True}] +
            [{"forward": [tok]} for tok in forced[:-1]])


def perplexity_steps(ids: list[int], chunk: int = 256) -> list[dict]:
    return [{"reset": len(ids)}] + [{"forward": ids[s:s + chunk], "all_logits": True} for s in range(0, len(ids), chunk)]


def perplexity_from(outputs: list[np.ndarray], ids: list[int]) -> float:
    """Perplexity of `ids` from the chunked logits of perplexity_steps."""
    nll, prev, start = 0.0, None, 0
    for logits in outputs:
        part = ids[start:start + len(logits)]
        lp = _log_softmax(logits)
        targets = part[1:] if prev is None else part
        rows = lp[:-1] if prev is None else np.concatenate([prev[None], lp[:-1]])
        nll -= float(rows[np.arange(len(targets)), targets].sum())
        prev, start = lp[-1], start + len(logits)
    return math.exp(nll / (len(ids) - 1))


def _perplexity_torch(model, ids: list[int]) -> float:
    lp = _log_softmax(_torch_logits(model, ids))
    return math.exp(-float(lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def same_quant_model(model, artifact):
    """A copy of `model` carrying the artifact's dequantized weights (the same-quant reference)."""
    import torch

    from .exporters import TARGETS

    weights = TARGETS.get(artifact.target)().same_quant_weights(model, artifact.path, artifact.manifest)
    ref = copy.deepcopy(model)
    if "lm_head.weight" in weights and hasattr(ref, "lm_head"):  # untie: lm_head has its own weights now
        ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
    params = dict(ref.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise SlmExportError(f"the reference model has no parameter {missing[0]}; is it the model this artifact was exported from?")
    with torch.no_grad():
        for name, w in weights.items():
            if tuple(params[name].shape) != w.shape:
                raise SlmExportError(f"{name}: artifact weight {w.shape} does not fit the reference model's {tuple(params[name].shape)}")
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return ref.eval()


RANDOM_PROMPT = "random token ids: the artifact has no tokenizer (so no perplexity either)"


def check_lengths(manifest: dict, prompt_tokens: int, decode_steps: int) -> None:
    """Refuse, before anything loads, lengths the artifact's KV cache cannot hold (one line per flag)."""
    if prompt_tokens < 1:
        raise SlmExportError(f"--prompt-tokens {prompt_tokens} is out of range; use an integer >= 1")
    if decode_steps < 0:
        raise SlmExportError(f"--decode-steps {decode_steps} is out of range; use an integer >= 0")
    room = manifest["max_context"]
    if prompt_tokens + decode_steps > room:
        raise SlmExportError(f"--prompt-tokens {prompt_tokens} + --decode-steps {decode_steps} exceed the artifact's "
                             f"max context of {room} tokens; use at most {room} in all")


def _prompt_ids(artifact, n: int) -> tuple[object, list[int]]:
    """(codec or None, n prompt ids): the shipped passage, or random ids when the artifact has no tokenizer."""
    if not artifact.manifest.get("tokenizer", {}).get("present"):
        # random ids still exercise every position and the cache
        return None, np.random.default_rng(0).integers(0, artifact.manifest["model"]["vocab_size"], n).tolist()
    codec = artifact.codec()
    return codec, first_passage_ids(codec, n)


def _open_verify_device(device: str | None, options: dict | None):
    """The device verify runs the artifact on, or None for this process."""
    if not device or device == "local":
        return None
    from .devices import open_device

    dev = open_device(device, **(options or {}))
    if not hasattr(dev, "replay"):
        raise SlmExportError(f"verify cannot run on {dev.name} yet: use local, sim:PROFILE or limits:PROFILE "
                             "(and bench for the other devices)")
    return dev


def verify(artifact, reference=None, *, prompt_tokens: int = 128, decode_steps: int = 32,
           perplexity: bool = True, perplexity_tokens: int = 2048, threads: int | None = None,
           tolerances: dict[str, Tolerance] | None = None, device: str | None = None,
           device_options: dict | None = None, model_path: str | None = None,
           calibration_text: str | None = None) -> ParityReport:
    """Compare `artifact` with PyTorch. `reference`: a model object; by default the recorded source, found
    where this machine read it (slm_export/sources.py) or at `model_path` (a folder, .gguf file or hub id).
    `calibration_text`: the user's calibration file the export read, where this machine did not read it.

    `device`: run the artifact there (e.g. sim:raspberry-pi-5 under ARM emulation) and also compare
    it with this machine's run."""
    from .quantize.replay import reused

    with reused():  # the weight check and a re-quantized same-quant reference share one re-quantization
        return _verify(artifact, reference, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
                       perplexity=perplexity, perplexity_tokens=perplexity_tokens, threads=threads,
                       tolerances=tolerances, device=device, device_options=device_options,
                       model_path=model_path, calibration_text=calibration_text)


def _verify(artifact, reference, *, prompt_tokens, decode_steps, perplexity, perplexity_tokens, threads,
            tolerances, device, device_options, model_path, calibration_text) -> ParityReport:
    import platform

    from .errors import RuntimeUnavailable
    from .exporters import TARGETS
    from .loading import from_object, load
    from .runtimes.replay import run_steps
    from .sources import find_model, find_text

    check_lengths(artifact.manifest, prompt_tokens, decode_steps)  # before anything loads
    src = artifact.manifest["source"]
    if reference is None and src.get("kind") == "object" and not model_path:
        raise SlmExportError(
            "this artifact was exported from an in-memory model; verify it from Python: artifact.verify(reference=model)")
    where = find_model(src, model_path) if reference is None else None
    calibration = artifact.manifest["quant"].get("calibration") or {}
    if calibration.get("file") is not None:  # the user's text, which the weight check quantizes with again
        find_text(calibration, calibration_text)
    elif calibration_text is not None:  # a flag that would be ignored is refused, not dropped
        read_from = "the shipped calibration passage" if calibration else "no calibration text"
        raise SlmExportError(f"--calibration-text {calibration_text}: this artifact was exported with {read_from}, "
                             "so verify needs none; leave the flag out")
    codec, ids = _prompt_ids(artifact, prompt_tokens)
    dev = _open_verify_device(device, device_options)
    if reference is None:
        loaded = load(where, tokenizer=False)  # the reference model; the artifact has the tokenizer
        model = loaded.model
    else:
        from .custom import is_plain_module

        # a plain module is its own reference: its forward is what the export must match
        model = reference.float().eval() if is_plain_module(reference) else from_object(reference).model
    exporter = TARGETS.get(artifact.target)()
    not_executed = ""
    try:
        runner = artifact.runner(threads)
        executed_by = artifact.manifest["runtime"]
    except RuntimeUnavailable as e:  # e.g. Core ML on Linux: the target's stand-in, said plainly
        not_executed = str(e)
        runner = exporter.stand_in_runner(model, artifact.path, artifact.manifest, threads)
        executed_by = runner.description
    bits = artifact.manifest["quant"]["spec"]["bits"]
    with progress.stage("checking the stored weights against the reference quantized again"):
        checks = exporter.package_checks(artifact.path, artifact.manifest, model)
    report = ParityReport(str(artifact.path), artifact.target, artifact.manifest["quant"]["label"], prompt_tokens,
                          decode_steps, executed_by=executed_by, not_executed=not_executed,
                          checks=checks,
                          prompt="the shipped passage" if codec is not None else RANDOM_PROMPT)

    with progress.stage("PyTorch's greedy run"):
        forced = _torch_greedy(model, ids, decode_steps)
    steps = logits_steps(ids, forced)
    text_ids = []
    if perplexity and codec is not None:
        text_ids = passage_ids(codec)[:min(perplexity_tokens, artifact.manifest["max_context"])]
    with progress.stage(f"running the artifact ({executed_by})"):
        here = np.concatenate(run_steps(runner, steps))
    # Perplexity runs here even with a device: 2048 positions under QEMU take many minutes (its float math
    # is software-emulated), and the device's divergence from this run is measured directly below.
    with progress.stage(f"the artifact's perplexity over {len(text_ids)} tokens"):
        text_logits = run_steps(runner, perplexity_steps(text_ids)) if text_ids else []
    if dev is None:
        art = here
    else:
        with progress.stage(f"running the artifact on {dev.name}"):
            art = np.concatenate(dev.replay(artifact.path, steps, threads=threads))
        report.device = dev.name
        report.executed_by = f"{executed_by} on {dev.name}" + (f" ({dev.emulated})" if dev.emulated else "")
    full = ids + forced[:-1]
    arm = bool(dev and dev.emulated)  # the device runs the runtime's aarch64 build
    for name, tol in {**artifact_tolerances(artifact.manifest, arm), **(tolerances or {})}.items():
        with progress.stage(f"PyTorch {name} reference"):
            ref_model = model if name == "fp32" else same_quant_model(model, artifact)
            report.comparisons.append(compare(_torch_logits(ref_model, full), art, decode_steps, name, tol))
    if arm:  # the ARM build's kernels against this machine's
        activations = artifact.manifest["quant"]["spec"].get("activations", "int8")
        tol = (tolerances or {}).get("host", host_tolerance(bits, activations))
        report.comparisons.append(compare(here, art, decode_steps, f"{platform.machine()} run", tol))

    if text_ids:
        report.perplexity = {"tokens": len(text_ids), "artifact": perplexity_from(text_logits, text_ids),
                             "pytorch_fp32": None, "artifact_run": "local"}
        with progress.stage(f"PyTorch's perplexity over {len(text_ids)} tokens"):
            report.perplexity["pytorch_fp32"] = _perplexity_torch(model, text_ids)
    return report


def check(report: ParityReport) -> None:
    if not report.passed:
        failed = [f"parity against {c.reference}" for c in report.comparisons if not c.passed]
        failed += [f"check '{c['name']}'" for c in report.checks if not c["passed"]]
        raise ParityFailure(f"failed: {', '.join(failed)} (see the table above)")


def write_json(report: ParityReport, path) -> None:
    from pathlib import Path

    Path(path).write_text(json.dumps(report.to_dict(), indent=1))


def write_junit_xml(report: ParityReport, path) -> None:
    """One <testcase> per reference, a <failure> when over tolerance: CI systems show it natively."""
    from pathlib import Path
    from xml.etree import ElementTree as ET

    failures = sum(not c.passed for c in report.comparisons) + sum(not c["passed"] for c in report.checks)
    suite = ET.Element("testsuite", name="slm-export verify", tests=str(len(report.comparisons) + len(report.checks)),
                       failures=str(failures), errors="0")
    props = ET.SubElement(suite, "properties")
    for k, v in (("artifact", report.artifact), ("target", report.target), ("quant", report.quant),
                 *((f"perplexity_{k}", f"{v}") for k, v in report.perplexity.items())):
        ET.SubElement(props, "property", name=k, value=str(v))
    for c in report.comparisons:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{report.target}.{report.quant}", name=f"against_{c.reference}")
        text = (f"mean KL {c.mean_kl:.6f}, {c.top1_line()}, max |dlogit| {c.max_abs_logit_diff:.4f}, "
                f"greedy match {c.greedy_match_tokens}/{c.decode_steps}; tolerance {c.tolerance}")
        if c.passed:
            ET.SubElement(case, "system-out").text = text
        else:
            ET.SubElement(case, "failure", message=f"parity against {c.reference} over tolerance").text = text
    for c in report.checks:  # the target's checks of its files (e.g. the weights are the quantizer's)
        case = ET.SubElement(suite, "testcase", classname=f"checks.{report.target}.{report.quant}", name=c["name"])
        if c["passed"]:
            ET.SubElement(case, "system-out").text = c["detail"]
        else:
            ET.SubElement(case, "failure", message=f"check '{c['name']}' failed").text = c["detail"]
    ET.ElementTree(suite).write(Path(path), encoding="utf-8", xml_declaration=True)
