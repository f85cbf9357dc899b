"""How good is `slm-export fit`? Its predictions against measurements on this machine (profile `local`).

    .venv/bin/python benchmarks/fit_check.py                       # ONNX fp32/int8/int4 (~8 min on 2 cores)
    .venv/bin/python benchmarks/fit_check.py --targets onnx,executorch   # + ExecuTorch (~15 min more)

For each export of the bundled SmolLM2-135M-Instruct: fit's decode tok/s and memory (from the artifact's
real per-weight sizes, at the context the bench uses) against `bench` on the `local` device
(prompts of 32 and 512 tokens). Writes benchmarks/fit_check.json and benchmarks/FIT_CHECK.md.
Exports are kept in benchmarks/.cache/fit and reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slm_export import export, open_artifact  # noqa: E402
from slm_export.devices.local import describe  # noqa: E402
from slm_export.devices.profiles import load_profile  # noqa: E402
from slm_export.fit import fit  # noqa: E402
from slm_export.quiet import quiet_third_party  # noqa: E402

WARMUP, DECODE = 8, 128


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=lambda s: s.split(","), default=["onnx"])
    ap.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[16, 8, 4])
    ap.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[32, 512])
    args = ap.parse_args()
    quiet_third_party()
    cache = HERE / ".cache" / "fit"
    cache.mkdir(parents=True, exist_ok=True)
    laptop = load_profile("local")
    rows = []
    for target in args.targets:
        for bits in args.bits:
            out = cache / f"{target}-int{bits}"
            art = open_artifact(out) if (out / "manifest.json").exists() else export(target=target, bits=bits, out=out, force=True)
            for p in args.prompt_tokens:
                # decode runs from p + warm-up to p + warm-up + DECODE tokens: predict at the middle,
                # and size the memory for the cache the runner allocates.
                at_decode = fit(laptop, artifact=art.path, context=p + WARMUP + DECODE // 2, prompt_tokens=p)
                at_memory = fit(laptop, artifact=art.path, context=p + WARMUP + DECODE + 1, prompt_tokens=p)
                (r,) = art.bench(prompt_tokens=(p,), decode_tokens=DECODE, warmup=WARMUP, repeats=3)
                rows.append({
                    "target": target, "quant": art.manifest["quant"]["label"], "prompt_tokens": p,
                    "predicted_decode_tok_s": at_decode.expected_decode_tok_s_full_context,
                    "roofline_tok_s": at_decode.roofline_tok_s_full_context,
                    "measured_decode_tok_s": r.decode_tok_s, "predicted_memory_mb": at_memory.total_mb,
                    "measured_peak_rss_mb": r.peak_rss_mb, "error": r.error,
                    "decode_error_pct": round(100 * (at_decode.expected_decode_tok_s_full_context / r.decode_tok_s - 1), 1) if r.decode_tok_s else None,
                    "memory_error_pct": round(100 * (at_memory.total_mb / r.peak_rss_mb - 1), 1) if r.peak_rss_mb else None,
                })
                print(rows[-1], flush=True)
    machine = describe()
    (HERE / "fit_check.json").write_text(json.dumps({"machine": machine, "profile": laptop.summary(), "rows": rows}, indent=1))
    lines = [f"# `slm-export fit` against measurements on this machine\n",
             f"{time.strftime('%Y-%m-%d')}, {machine['cores']}x {machine['cpu']}, profile `local` "
             f"(measured copy bandwidth {laptop.sustained_bandwidth_gb_s} GB/s), SmolLM2-135M-Instruct, "
             f"{WARMUP} warm-up + {DECODE} timed decode steps. Command: `.venv/bin/python benchmarks/fit_check.py "
             f"--targets {','.join(args.targets)}`.\n",
             "| target | quant | prompt | predicted tok/s | roofline tok/s | measured tok/s | error | predicted MB | measured peak RSS MB | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['quant']} | {r['prompt_tokens']} | {r['predicted_decode_tok_s']:.0f} | "
                     f"{r['roofline_tok_s']:.0f} | {r['measured_decode_tok_s'] or 0:.1f} | {r['decode_error_pct']:+.0f}% | "
                     f"{r['predicted_memory_mb']:.0f} | {r['measured_peak_rss_mb'] or 0:.0f} | {r['memory_error_pct']:+.0f}% |")
    (HERE / "FIT_CHECK.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
