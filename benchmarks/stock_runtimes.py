"""The stock app runtimes against slm-export's runner, on the same files, in one sitting.

    .venv/bin/python benchmarks/stock_runtimes.py                      # exports SmolLM2-135M int4 twice (~15 min)
    .venv/bin/python benchmarks/stock_runtimes.py --pte DIR --onnx DIR   # exports you already have

`slm-export bench --runtime all` on the default int4 .pte (slm-export's runner against ExecuTorch's
TextLLMRunner, the runner behind Android's LlmModule) and the default int4 ONNX folder (slm-export's runner
against onnxruntime-genai), 32- and 512-token prompts, 128 timed decode tokens after 8 warm-up ones, TTFT the
median of 3 runs. The .pte also runs in ExecuTorch's Python bindings with slm-export's loop
(`executorch-pybind`): ExecuTorch's kernels without its runner, which splits a gap between kernels and runner.
Rounds alternate the runtimes (a load change on a shared machine hits each); a ratio is the median of the
per-round ratios of decode tok/s (stock / ours).

Writes benchmarks/stock_runtimes.json and benchmarks/STOCK_RUNTIMES.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import slm_export  # noqa: E402
from slm_export.bench import bench  # noqa: E402  (not Artifact.bench: nothing is written into the folders)
from slm_export.devices import open_device  # noqa: E402
from slm_export.devices.local import describe  # noqa: E402
from slm_export.runtimes.measure import prompt_ids  # noqa: E402

SETTINGS = dict(prompt_tokens=(32, 512), decode_tokens=128, warmup=8, repeats=3)
PYBIND = "executorch-pybind"  # ExecuTorch's own kernels (custom_sdpa), slm-export's loop
FIELDS = ("runtime", "prompt_tokens", "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_tok_s_min",
          "decode_tok_s_max", "load_s", "peak_rss_mb", "baseline_rss_mb", "error")


def export(target: str, out: Path) -> Path:
    print(f"exporting the bundled model: slm-export export --target {target} --bits 4", flush=True)
    subprocess.run([sys.executable, "-m", "slm_export.cli", "export", "--target", target, "--bits", "4", "--out", str(out),
                    "-q"], check=True, stdout=subprocess.DEVNULL)
    return out


def pybind_rows(art, threads: int) -> list[dict]:
    """The .pte in ExecuTorch's Python bindings, measured as bench measures (one process per prompt length)."""
    dev, rows = open_device("local"), []
    for p in SETTINGS["prompt_tokens"]:
        (r,) = dev.measure(art.path, prompts=[prompt_ids(art, p)], decode_tokens=SETTINGS["decode_tokens"],
                           warmup=SETTINGS["warmup"], repeats=SETTINGS["repeats"], threads=threads, runtime=PYBIND)
        rows.append({"runtime": PYBIND, "error": None, **r})
    return rows


def ratios(rounds: list[list[dict]], ours: str, others: list[str]) -> dict:
    """{other: {prompt: median over rounds of other's decode tok/s / ours, and the per-round values}}."""
    out = {}
    for other in others:
        out[other] = {}
        for p in SETTINGS["prompt_tokens"]:
            per_round = []
            for rows in rounds:
                by = {r["runtime"]: r for r in rows if r["prompt_tokens"] == p}
                if by.get(other, {}).get("decode_tok_s") and by.get(ours, {}).get("decode_tok_s"):
                    per_round.append({k: round(by[other][k] / by[ours][k], 3) for k in ("decode_tok_s", "ttft_ms")})
            out[other][p] = {"decode_ratio": statistics.median(r["decode_tok_s"] for r in per_round) if per_round else None,
                             "ttft_ratio": statistics.median(r["ttft_ms"] for r in per_round) if per_round else None,
                             "per_round": per_round}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Stock app runtimes against slm-export's runner ({result['date']})", "",
             f"Machine: {m.get('cpu')}, {result['threads']} threads; load average before: {result['load_before']}. "
             f"Settings: prompts {', '.join(map(str, SETTINGS['prompt_tokens']))} tokens (the shipped passage), "
             f"{SETTINGS['decode_tokens']} timed greedy decode tokens after {SETTINGS['warmup']} warm-up ones, "
             f"TTFT the median of {SETTINGS['repeats']} runs; {result['rounds']} rounds, runtimes alternating. "
             "Made by `benchmarks/stock_runtimes.py`; raw rows in `stock_runtimes.json`.", ""]
    for label, part in result["artifacts"].items():
        lines += [f"## {label}: `{part['system']}`", "",
                  "| round | runtime | prompt | TTFT ms | prefill tok/s | decode tok/s | min | max | peak RSS MB | baseline RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for i, rows in enumerate(part["rounds"], 1):
            for r in rows:
                if r.get("error"):
                    lines.append(f"| {i} | {r['runtime']} | {r['prompt_tokens']} | FAILED: {r['error'][:120]} |||||||")
                    continue
                lines.append(f"| {i} | {r['runtime']} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.0f} | "
                             f"{r['decode_tok_s']:.1f} | {r['decode_tok_s_min']:.1f} | {r['decode_tok_s_max']:.1f} | "
                             f"{r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} |")
        lines += ["", f"Median of the per-round ratios against `{part['ours']}` (decode: tok/s; TTFT: ms; above 1 = "
                      "faster decode, slower first token):", "",
                  "| runtime | prompt | decode ratio | TTFT ratio |", "|---|---|---|---|"]
        for other, by_prompt in part["ratios"].items():
            for p, r in by_prompt.items():
                fmt = (lambda v: "-" if v is None else f"{v:.2f}x")
                lines.append(f"| {other} | {p} | {fmt(r['decode_ratio'])} | {fmt(r['ttft_ratio'])} |")
        lines.append("")
    return "\n".join(lines)


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pte", type=Path, default=None, help="a default int4 .pte export (default: export one)")
    ap.add_argument("--onnx", type=Path, default=None, help="a default int4 ONNX export (default: export one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE, help="where stock_runtimes.json and STOCK_RUNTIMES.md go")
    a = ap.parse_args(argv)
    started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _load()
    result = {"schema_version": 1, "date": started, "machine": describe(), "threads": a.threads, "rounds": a.rounds,
              "load_before": load_before, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
              "artifacts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"pte": a.pte or export("executorch", Path(tmp) / "pte"),
                   "onnx": a.onnx or export("onnx", Path(tmp) / "onnx")}
        arts = {k: slm_export.open_artifact(v) for k, v in folders.items()}
        rounds = {k: [] for k in arts}
        for i in range(a.rounds):
            for label, art in arts.items():
                print(f"round {i + 1}/{a.rounds}: {label} (load {_load()})", flush=True)
                rows = [{k: getattr(r, k) for k in FIELDS} for r in bench(art, runtime="all", threads=a.threads, **SETTINGS)]
                if art.manifest["target"] == "executorch":
                    rows += pybind_rows(art, a.threads)
                rounds[label].append([{k: r.get(k) for k in FIELDS} for r in rows])
        for label, art in arts.items():
            ours = art.manifest["runtime"]
            others = sorted({r["runtime"] for rows in rounds[label] for r in rows} - {ours})
            result["artifacts"][label] = {"system": f"slm-export {art.manifest['target']} {art.manifest['quant']['label']}",
                                          "ours": ours, "size_mb": round(art.size_mb, 2), "rounds": rounds[label],
                                          "ratios": ratios(rounds[label], ours, others)}
    result["load_after"] = _load()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "stock_runtimes.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "STOCK_RUNTIMES.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {a.out / 'stock_runtimes.json'} and {a.out / 'STOCK_RUNTIMES.md'}")
    return result


if __name__ == "__main__":
    main()
