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

Writes benchmarks/stock_runtimes.json and benchmarks/STOCK_RUNTIMES.md (`--only pte|onnx` measures one export and
keeps the other's results, each with its own date and load).
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
          "decode_tok_s_max", "load_s", "peak_rss_mb", "baseline_rss_mb", "error", "samples")
STATS = ("decode_tok_s", "decode_tok_s_p90", "ttft_ms")  # the ratios reported


def with_p90(row: dict) -> dict:
    """`row` with decode_tok_s_p90: tok/s of its fastest-decile step (the 10th percentile of step times), which
    other work on a shared machine disturbs less than the median (a step is slowed, never sped up, by it)."""
    steps = sorted((row.get("samples") or {}).get("decode_step_ms") or [])
    return {**row, "decode_tok_s_p90": round(1000 / steps[len(steps) // 10], 3) if steps else None}


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
    """{other: {prompt: the median over rounds of other's / ours for each of STATS, and the per-round values}}."""
    out = {}
    for other in others:
        out[other] = {}
        for p in SETTINGS["prompt_tokens"]:
            per_round = []
            for rows in rounds:
                by = {r["runtime"]: r for r in rows if r["prompt_tokens"] == p}
                if by.get(other, {}).get("decode_tok_s") and by.get(ours, {}).get("decode_tok_s"):
                    per_round.append({k: round(by[other][k] / by[ours][k], 3) for k in STATS})
            out[other][p] = {**{f"{k}_ratio": statistics.median(r[k] for r in per_round) if per_round else None
                                for k in STATS}, "per_round": per_round}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Stock app runtimes against slm-export's runner", "",
             f"Machine: {m.get('cpu')}, {result['threads']} threads. "
             f"Settings: prompts {', '.join(map(str, SETTINGS['prompt_tokens']))} tokens (the shipped passage), "
             f"{SETTINGS['decode_tokens']} timed greedy decode tokens after {SETTINGS['warmup']} warm-up ones, "
             f"TTFT the median of {SETTINGS['repeats']} runs; rounds alternate the runtimes. `p90` is the tok/s of "
             "the fastest decile of decode steps (other work on a shared machine slows steps, never speeds them up). "
             "Made by `benchmarks/stock_runtimes.py`; raw rows and per-step samples in `stock_runtimes.json`.", ""]
    for label, part in result["artifacts"].items():
        lines += [f"## {label}: `{part['system']}`, {part['size_mb']} MB", "",
                  f"{part['date']}, {part['rounds_run']} rounds; load average (1, 5, 15 min) before {part['load_before']}, "
                  f"after {part['load_after']}.", "",
                  "| round | runtime | prompt | TTFT ms | prefill tok/s | decode tok/s | p90 | min | max | peak RSS MB | baseline RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, rows in enumerate(part["rounds"], 1):
            for r in rows:
                if r.get("error"):
                    lines.append(f"| {i} | {r['runtime']} | {r['prompt_tokens']} | FAILED: {r['error'][:120]} ||||||||")
                    continue
                lines.append(f"| {i} | {r['runtime']} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.0f} | "
                             f"{r['decode_tok_s']:.1f} | {r['decode_tok_s_p90']:.1f} | {r['decode_tok_s_min']:.1f} | {r['decode_tok_s_max']:.1f} | "
                             f"{r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} |")
        lines += ["", f"Median of the per-round ratios against `{part['ours']}` (decode: tok/s, above 1 = faster; "
                      "TTFT: ms, above 1 = slower):", "",
                  "| runtime | prompt | decode (median) | decode (p90) | TTFT | per round (median decode) |", "|---|---|---|---|---|---|"]
        fmt = (lambda v: "-" if v is None else f"{v:.2f}x")
        for other, by_prompt in part["ratios"].items():
            for p, r in by_prompt.items():
                lines.append(f"| {other} | {p} | {fmt(r['decode_tok_s_ratio'])} | {fmt(r['decode_tok_s_p90_ratio'])} | "
                             f"{fmt(r['ttft_ms_ratio'])} | {', '.join(fmt(x['decode_tok_s']) for x in r['per_round'])} |")
        lines.append("")
    return "\n".join(lines)


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pte", type=Path, default=None, help="a default int4 .pte export (default: export one)")
    ap.add_argument("--onnx", type=Path, default=None, help="a default int4 ONNX export (default: export one)")
    ap.add_argument("--only", choices=["pte", "onnx"], default=None,
                    help="measure one of the two exports only (the other's results in --out's JSON are kept)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE, help="where stock_runtimes.json and STOCK_RUNTIMES.md go")
    a = ap.parse_args(argv)
    previous = a.out / "stock_runtimes.json"
    keep = json.loads(previous.read_text())["artifacts"] if a.only and previous.is_file() else {}
    result = {"schema_version": 1, "machine": describe(), "threads": a.threads,
              "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()}, "artifacts": keep}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        if a.only != "onnx":
            folders["pte"] = a.pte or export("executorch", Path(tmp) / "pte")
        if a.only != "pte":
            folders["onnx"] = a.onnx or export("onnx", Path(tmp) / "onnx")
        arts = {k: slm_export.open_artifact(v) for k, v in folders.items()}
        started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _load()
        rounds = {k: [] for k in arts}
        for i in range(a.rounds):
            for label, art in arts.items():
                print(f"round {i + 1}/{a.rounds}: {label} (load {_load()})", flush=True)
                rows = [{k: getattr(r, k) for k in FIELDS} for r in bench(art, runtime="all", threads=a.threads, **SETTINGS)]
                if art.manifest["target"] == "executorch":
                    rows += pybind_rows(art, a.threads)
                rounds[label].append([with_p90({k: r.get(k) for k in FIELDS}) for r in rows])
        for label, art in arts.items():
            ours = art.manifest["runtime"]
            others = sorted({r["runtime"] for rows in rounds[label] for r in rows} - {ours})
            result["artifacts"][label] = {"system": f"slm-export {art.manifest['target']} {art.manifest['quant']['label']}",
                                          "ours": ours, "size_mb": round(art.size_mb, 2), "date": started,
                                          "rounds_run": a.rounds, "load_before": load_before, "load_after": _load(),
                                          "rounds": rounds[label], "ratios": ratios(rounds[label], ours, others)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "stock_runtimes.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "STOCK_RUNTIMES.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {a.out / 'stock_runtimes.json'} and {a.out / 'STOCK_RUNTIMES.md'}")
    return result


if __name__ == "__main__":
    main()
