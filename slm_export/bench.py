"""`slm-export bench`: measure an artifact on a device, in the one results schema.

`runtime` chooses what runs it: `ours` (the artifact's own runtime, slm-export's runner), `stock` (every app
runtime that opens the export as it is: runtimes.STOCK_RUNTIMES), `all` (both), or a stock runtime's name;
comma-separated. Each is measured the same way (runtimes/measure.py), one row per runtime and prompt length.
"""
from __future__ import annotations

import sys
import time

from . import manifest as mf
from . import progress
from .devices import open_device
from .errors import SlmExportError
from .fit import fit
from .registry import Registry
from .results import BenchResult
from .runtimes import RUNTIMES, STOCK_RUNTIMES
from .runtimes.measure import prompt_ids


def weight_bytes_per_token(artifact) -> int:
    """Bytes of weights a decode step reads (see fit.bytes_read_per_token), from the artifact's report."""
    from .fit import bytes_read_per_token, report_weight_bytes

    return bytes_read_per_token(report_weight_bytes(artifact.path))


def check_lengths(manifest: dict, prompt_tokens, decode_tokens: int, warmup: int, repeats: int) -> None:
    """Refuse, before anything runs, counts out of range or runs the artifact's KV cache cannot hold."""
    for flag, value, low in (("--decode-tokens", decode_tokens, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1),
                             *(("--prompt-tokens", p, 1) for p in prompt_tokens)):
        if value < low:
            raise SlmExportError(f"{flag} {value} is out of range; use an integer >= {low}")
    room, longest = manifest["max_context"], max(prompt_tokens)
    if longest + warmup + decode_tokens > room:
        raise SlmExportError(f"--prompt-tokens {longest} + --warmup {warmup} + --decode-tokens {decode_tokens} exceed the "
                             f"artifact's max context of {room} tokens; use at most {room} in all")


OURS = None  # in a plan: the artifact's own runtime


def _choices() -> Registry:
    """Each word `--runtime` takes -> (include ours, the stock runtimes named or None for the target's own)."""
    choices = Registry("runtime")
    choices.register("ours")((True, ()))
    choices.register("stock")((False, None))
    choices.register("all")((True, None))
    for name in STOCK_RUNTIMES.names():
        choices.register(name)((False, (name,)))
    return choices


def runtime_words(runtime: str) -> str:
    """`runtime` if each of its comma-separated words is a choice (else one line listing them), before anything opens."""
    choices = _choices()
    for word in runtime.split(","):
        choices.get(word.strip())
    return runtime


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def runtime_plan(manifest: dict, runtime: str, say=_say) -> list[str | None]:
    """The runtimes `runtime` names for this artifact, in order: OURS, then stock runtimes' names.

    A stock runtime asked for by `stock` or its name that cannot run (not applicable to the export, not
    installed) is refused in one line; under `all` that line goes to `say` and the rest is measured."""
    choices, plan = _choices(), []
    for word in [w.strip() for w in runtime_words(runtime).split(",")]:
        ours, names = choices.get(word)
        if ours and OURS not in plan:
            plan.append(OURS)
        lenient = word == "all"
        if names is None:  # the target's own: every stock runtime that opens this target's exports
            names = [n for n in STOCK_RUNTIMES.names() if STOCK_RUNTIMES.get(n).target == manifest["target"]]
            if not names:
                why = f"no stock runtime opens {manifest['target']} exports (stock runtimes: {', '.join(STOCK_RUNTIMES.names())})"
                if not lenient:
                    raise SlmExportError(f"--runtime {word}: {why}")
                say(f"bench: {why}; measured slm-export's runner only")
        for name in names:
            cls = STOCK_RUNTIMES.get(name)
            try:
                why = cls.refusal(manifest)
                if why:
                    raise SlmExportError(f"{name} is not applicable to this export: {why}")
                cls.check_available()
            except SlmExportError as e:
                if not lenient:
                    raise
                say(f"bench: not measured: {e}")
                continue
            if name not in plan:
                plan.append(name)
    return plan


def _on_device(plan: list, runtime: str, dev, say=_say) -> list:
    """`plan` without its stock runtimes on a device that runs slm-export's runtimes only (under `all`;
    otherwise one line refuses)."""
    stock = [rt for rt in plan if rt is not OURS]
    if not stock or getattr(dev, "stock_runtimes", False):
        return plan
    why = f"{', '.join(stock)} is measured on this machine only (--device local or limits:PROFILE), not on {dev.name}"
    if "all" not in runtime.split(","):
        raise SlmExportError(why)
    say(f"bench: not measured: {why}")
    return [OURS]


def _prompt(artifact, ids: list[int], runtime: str | None):
    """What the measuring process gets for one prompt: its ids, and its text for a runtime that takes text."""
    if runtime is OURS or not STOCK_RUNTIMES.get(runtime).takes_text:
        return ids
    return {"ids": ids, "text": artifact.codec().decode(ids)}


def bench(artifact, *, device: str = "local", prompt_tokens=(32,), decode_tokens: int = 128, warmup: int = 8,
          repeats: int = 3, threads: int | None = None, device_options: dict | None = None,
          runtime: str = "ours", say=_say) -> list[BenchResult]:
    """Rows for each prompt length and runtime (see the module's docstring); `say` gets the one-line notes
    of stock runtimes `all` leaves out."""
    m = artifact.manifest
    check_lengths(m, prompt_tokens, decode_tokens, warmup, repeats)
    plan = runtime_plan(m, runtime, say)
    if OURS in plan:
        RUNTIMES.get(m["runtime"]).check_available()  # e.g. Core ML off macOS: one sentence, no empty rows
    dev = open_device(device, **(device_options or {}))
    plan = _on_device(plan, runtime, dev, say)
    profile = dev.profile
    extra = m.get("target_extra", {})
    kv_bits = extra.get("kv_bits", 32)
    fp16 = extra.get("compute_precision") == "float16"  # its KV cache is fp16 too: no kv suffix
    base = dict(system=f"slm-export {m['target']} {m['quant']['label']}" + (f" kv{kv_bits}" if kv_bits != 32 and not fp16 else ""),
                model=mf.source_label(m["source"]),
                target=m["target"], device=dev.name, simulated=dev.simulated,
                quant=m["quant"]["label"], artifact_mb=round(artifact.size_mb, 2),
                device_peak_gb_s=profile.peak_bandwidth_gb_s if profile else None,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    per_token = weight_bytes_per_token(artifact)
    results = []
    for p in prompt_tokens:
        # fit's estimate for this device at the middle of the timed decode, from the artifact's real weights
        predicted = profile and fit(profile, artifact=artifact.path, context=p + warmup + decode_tokens // 2)
        ids = prompt_ids(artifact, p)
        for rt in plan:  # runtimes alternate within a prompt length: a load change on the machine hits each
            packages = (RUNTIMES.get(m["runtime"]) if rt is OURS else STOCK_RUNTIMES.get(rt)).packages
            row = dict(base, runtime=m["runtime"] if rt is OURS else rt, prompt_tokens=p,
                       versions=mf.library_versions(*packages),
                       predicted_decode_tok_s=predicted.expected_decode_tok_s_full_context if predicted else None)
            results.append(_measure_row(artifact, dev, row, _prompt(artifact, ids, rt), rt, decode_tokens, warmup,
                                        repeats, threads, per_token))
    return results


def _measure_row(artifact, dev, row: dict, prompt, rt, decode_tokens, warmup, repeats, threads, per_token) -> BenchResult:
    """One process, one runtime, one prompt length: each row's peak RSS is its own."""
    try:
        with progress.stage(f"{dev.name}, {row['runtime']}: prompt {row['prompt_tokens']} + {decode_tokens} decoded "
                            f"tokens, {repeats} timed run" + ("s" if repeats != 1 else "")):
            (r,) = dev.measure(artifact.path, prompts=[prompt], decode_tokens=decode_tokens, warmup=warmup,
                               repeats=repeats, threads=threads, **({} if rt is OURS else {"runtime": rt}))
    except RuntimeError as e:  # a failed run is a row with its error, not a missing row
        return BenchResult(**row, machine=dev.describe(), error=str(e))
    if r.get("decode_tok_s") is not None:  # an emulated run reports no timings
        r["decode_gb_s"] = per_token * r["decode_tok_s"] / 1e9
    row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    machine = dict(dev.describe())  # after the run (a board's temperature after it); a copy per row
    if machine.get("runtimes"):  # a remote device: the versions that ran are the board's
        row["versions"] = {k: v for k, v in machine["runtimes"].items() if k in row["versions"]}
    return BenchResult(**row, machine=machine)
