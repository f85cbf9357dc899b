"""Export memory at 1-3B: peak RSS against the bf16 checkpoint's size, slm-export beside llama.cpp's converter.

    .venv/bin/python benchmarks/streaming_export.py                  # Llama-3.2-1B, Qwen2.5-1.5B, Llama-3.2-3B shapes
    .venv/bin/python benchmarks/streaming_export.py --bench          # ... and decode tok/s on 2 threads
    .venv/bin/python benchmarks/streaming_export.py --models smollm2-360m-bf16 --targets onnx \\
        --export-flags "--bits 4 --quant-method rtn --mixed-precision 0"      # quick (a few minutes)

Checkpoints: benchmarks/big_checkpoints.py writes each one (random bf16 weights in the real config, two or more
safetensors shards with an index, SmolLM2's tokenizer; see its docstring) under --work, once; later runs reuse
it. Its builder's time and peak RSS are recorded when it is built.

Each export of ours is the CLI command a user types (`python -m slm_export.cli export --model CKPT --target T
EXPORT_FLAGS --out DIR --force`), memory check included: a refusal is a row with its message, like any failure
(exit status and last output line). llama.cpp's path is its own two tools on the same folder:
convert_hf_to_gguf.py to an f16 GGUF, then Q4_0 by llama_model_quantize (llama-cpp-python's binding of the
code behind the llama-quantize binary), both as benchmarks/peers/llamacpp.py runs them (the converter from the
llama-cpp-python sdist, the library built with GGML_NATIVE=OFF and explicit AVX2/FMA/F16C). Every step runs
in a child process; its peak RSS is the child's ru_maxrss from wait4 (as export_memory.py: this parent
imports no torch or numpy, so a child's high-water mark is its own). RSS counts the checkpoint's pages a
tool maps and touches, as the kernel does. GB = 10^9 bytes; the goal drawn is peak RSS = checkpoint + 1 GB.

--bench: decode tok/s on --threads (2) after a 32-token prompt of the shipped passage, 128 timed steps after 8
warm-up ones (median), for our artifacts (`slm-export bench`, its own measuring process) and the Q4_0 GGUF
(benchmarks/peers: llama-cpp-python, the same protocol), with that process's peak RSS.

Appends to benchmarks/streaming_export.json (a row replaces the one with the same model, system and flags),
rewrites benchmarks/STREAMING_EXPORT.md and benchmarks/plots/streaming_export_peak_rss.png (drawn in
benchmarks/.venvs/plots, which has matplotlib, unless this Python has it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(HERE / "peers")]

import big_checkpoints  # noqa: E402  (standard library at import; numpy only in its child)
from export_memory import machine  # noqa: E402

RESULTS = HERE / "streaming_export.json"
REPORT = HERE / "STREAMING_EXPORT.md"
PLOT = HERE / "plots" / "streaming_export_peak_rss.png"
PLOTS_PY = HERE / ".venvs" / "plots" / "bin" / "python"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
DEFAULT_MODELS = ["llama3.2-1b-bf16", "qwen2.5-1.5b-bf16", "llama3.2-3b-bf16"]
LLAMACPP = "llama.cpp convert+quantize"
GOAL_GB = 1.0  # the goal: peak RSS of an export <= checkpoint + this
# ... except these targets' goal: peak RSS <= this x the checkpoint (Core ML: coremltools writes the program
# from its own copy of the codes, beside the quantizer's)
GOAL_TIMES = {"coreml": 2.0}


def goal(r: dict) -> tuple[str, float]:
    """(the goal a row is held to, its bound in bytes)."""
    times = GOAL_TIMES.get(r["system"].removeprefix("slm-export "))  # the system is "slm-export TARGET" (export())
    if times:
        return f"<= {times:g}x", times * r["checkpoint_bytes"]
    return f"<= +{GOAL_GB:g} GB", r["checkpoint_bytes"] + GOAL_GB * 1e9
BENCH = dict(prompt_tokens=32, decode_tokens=128, warmup=8, repeats=3)


def measured(cmd: list) -> dict:
    """{exit (as a shell shows it), wall_s, peak_rss_bytes, output} of one child (stdout and stderr together)."""
    t = time.perf_counter()
    p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         cwd=ROOT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"exit": code if code >= 0 else 128 - code, "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "output": out}


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines or ["(no output)"])[-1][:300]


def folder_bytes(path: Path) -> int | None:
    path = Path(path)
    if not path.exists():
        return None
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- checkpoints

def checkpoint(name: str, work: Path) -> tuple[Path, dict | None]:
    """(folder, the builder's figures if it was built now, else None): made once under work."""
    folder = work / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder, None
    tokenizer = work / big_checkpoints.TOKENIZER
    if not (tokenizer / "tokenizer.json").is_file():
        shutil.rmtree(tokenizer.with_name(tokenizer.name + ".tmp"), ignore_errors=True)
        got = measured([sys.executable, HERE / "big_checkpoints.py", "tokenizer", tokenizer])
        if got["exit"]:
            raise SystemExit(f"making SmolLM2's tokenizer failed: {last_line(got['output'])}")
    print(f"building {name} under {work}", flush=True)
    got = measured([sys.executable, HERE / "big_checkpoints.py", name, folder])
    if got["exit"]:
        raise SystemExit(f"building {name} failed: {last_line(got['output'])}")
    return folder, {"build_s": got["wall_s"], "build_peak_rss_gb": round(got["peak_rss_bytes"] / 1e9, 3)}


def checkpoint_facts(folder: Path) -> dict:
    """Parameters (from the safetensors headers) and bytes on disk of the weight files."""
    params, size = 0, 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        params += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        size += f.stat().st_size
    return {"params": params, "checkpoint_bytes": size}


# ---------------------------------------------------------------- the systems

def export_ours(ckpt: Path, target: str, flags: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    got = measured([sys.executable, "-m", "slm_export.cli", "export", "--model", ckpt, "--target", target, *flags,
                    "--out", out, "--force"])
    ok = got["exit"] == 0
    quant = json.loads((out / "manifest.json").read_text())["quant"]["label"] if ok else None
    return {"system": f"slm-export {target}", "quant": quant, "exit": got["exit"], "export_s": got["wall_s"],
            "peak_rss_bytes": got["peak_rss_bytes"], "artifact": str(out) if ok else None,
            "artifact_bytes": folder_bytes(out) if ok else None, "failure": None if ok else last_line(got["output"])}


def export_llamacpp(ckpt: Path, out_dir: Path) -> dict:
    """convert_hf_to_gguf.py to f16, then Q4_0; each step's time and peak; the f16 GGUF is removed after."""
    import llamacpp  # benchmarks/peers: standard library; its venv is built (~9 min) on first use

    py = llamacpp.ensure_venv()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    f16, q4 = out_dir / f"{ckpt.name}.f16.gguf", out_dir / f"{ckpt.name}.Q4_0.gguf"
    steps = {"convert": [sys.executable, "-c", llamacpp._CONVERT, llamacpp._converter(), ckpt, "--outtype", "f16",
                         "--outfile", f16],
             "quantize": [py, "-c", llamacpp._QUANTIZE, f16, q4, "Q4_0"]}
    row = {"system": LLAMACPP, "quant": "Q4_0", "exit": 0, "failure": None, "steps": {},
           "tools": f"convert_hf_to_gguf.py --outtype f16 and llama_model_quantize, llama-cpp-python {llamacpp.VERSION}"}
    for step, cmd in steps.items():
        got = measured(cmd)
        row["steps"][step] = {"s": got["wall_s"], "peak_rss_bytes": got["peak_rss_bytes"], "exit": got["exit"]}
        if step == "convert":
            row["steps"][step]["gguf_bytes"] = folder_bytes(f16)
        if got["exit"]:
            row.update(exit=got["exit"], failure=f"{step}: {last_line(got['output'])}")
            break
    f16.unlink(missing_ok=True)
    ok = row["exit"] == 0
    row.update(export_s=round(sum(s["s"] for s in row["steps"].values()), 1),
               peak_rss_bytes=max(s["peak_rss_bytes"] for s in row["steps"].values()),
               artifact=str(q4) if ok else None, artifact_bytes=folder_bytes(q4) if ok else None)
    return row


def prompt(ckpt: Path) -> list[int]:
    """The first 32 ids of the shipped passage in the checkpoint's tokenizer, as `slm-export bench` makes them."""
    code = ("import json, sys\nfrom tokenizers import Tokenizer\nfrom slm_export.text import passage_text\n"
            "ids = Tokenizer.from_file(sys.argv[1]).encode(passage_text()).ids\n"
            "print(json.dumps((ids * (int(sys.argv[2]) // len(ids) + 1))[:int(sys.argv[2])]))")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt / "tokenizer.json"), str(BENCH["prompt_tokens"])],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, check=True)
    return json.loads(r.stdout)


def bench(row: dict, ckpt: Path, threads: int) -> dict:
    """{decode_tok_s, runtime_peak_rss_bytes} of the row's artifact, or {bench_failure}."""
    if row["system"] == LLAMACPP:
        import llamacpp
        from common import PeerError

        try:
            (r,) = llamacpp.bench(llamacpp.ensure_venv(), row["artifact"], [prompt(ckpt)], BENCH["decode_tokens"],
                                  BENCH["warmup"], BENCH["repeats"], threads)
        except PeerError as e:
            return {"bench_failure": str(e)}
    else:
        r = subprocess.run([sys.executable, "-m", "slm_export.cli", "bench", row["artifact"], "-q", "--format", "json",
                            "--threads", str(threads), "--prompt-tokens", str(BENCH["prompt_tokens"]),
                            *(f"--{k.replace('_', '-')}={v}" for k, v in BENCH.items() if k != "prompt_tokens")],
                           capture_output=True, text=True, env=ENV, cwd=ROOT)
        if r.returncode:
            return {"bench_failure": last_line(r.stderr + r.stdout)}
        (r,) = json.loads(r.stdout)["results"]
        if r.get("error"):
            return {"bench_failure": r["error"]}
    return {"decode_tok_s": round(r["decode_tok_s"], 2), "runtime_peak_rss_bytes": round(r["peak_rss_mb"] * 1e6),
            "threads": threads}


# ---------------------------------------------------------------- report

def gb(n) -> str:
    return "" if n is None else f"{n / 1e9:.2f}"


def write_report(rows: list[dict]) -> None:
    lines = ["# Export memory at 1-3B: slm-export beside llama.cpp", "",
             "Written by `benchmarks/streaming_export.py` (see its docstring for the method). Random-weight bf16 "
             "checkpoints in the real configs (benchmarks/big_checkpoints.py). GB = 10^9 bytes. Peak RSS is the "
             f"export process's ru_maxrss; the goal is peak <= checkpoint + {GOAL_GB:g} GB (Core ML: <= 2x the checkpoint). llama.cpp: "
             "convert_hf_to_gguf.py to f16, then Q4_0 by llama_model_quantize (llama-cpp-python; export s = both steps, peak = the larger; each step is in "
             "streaming_export.json). Decode: tok/s after a 32-token prompt, 128 timed steps, on the threads given, "
             "with the runtime's peak RSS. Export s is not a timing benchmark on a shared machine.", "",
             "| model | params | checkpoint GB | system | flags | export s | peak RSS GB | peak / checkpoint | "
             "goal met | artifact GB | decode tok/s | runtime peak GB | machine | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["checkpoint_bytes"], r["system"], r.get("flags") or "")):
        ck = r["checkpoint_bytes"]
        system = f"{r['system']} {r['quant']}" if r.get("quant") else r["system"]
        export_s = r["export_s"] if r["exit"] == 0 else f"{r['export_s']}: FAILED (exit {r['exit']}): {r['failure']}"
        held_to, bound = goal(r)
        met = (f"{'yes' if r['peak_rss_bytes'] <= bound else 'no'} ({held_to})") if r["exit"] == 0 else ""
        decode = r.get("decode_tok_s") or (f"FAILED: {r['bench_failure']}" if r.get("bench_failure") else "")
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {gb(ck)} | {system} | {r.get('flags') or ''} | "
                     f"{export_s} | {gb(r['peak_rss_bytes'])} | {r['peak_rss_bytes'] / ck:.2f} | {met} | "
                     f"{gb(r.get('artifact_bytes'))} | {decode} | {gb(r.get('runtime_peak_rss_bytes'))} | "
                     f"{r['machine']} | {r['date']} |")
    builds = {r["model"]: r["build"] for r in rows if r.get("build")}
    if builds:
        lines += ["", "Building the checkpoints (benchmarks/big_checkpoints.py, tensor by tensor): " + "; ".join(
            f"{m}: {b['build_s']} s, peak RSS {b['build_peak_rss_gb']:.2f} GB" for m, b in builds.items()) + "."]
    REPORT.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> None:
    """Peak RSS against checkpoint size, a series per system (with its flags); the goal line. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["exit"] == 0]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    series = {}
    for r in ok:
        name = r["system"] + (f" ({r['flags']})" if r.get("flags") else "")
        series.setdefault(name, []).append((r["checkpoint_bytes"] / 1e9, r["peak_rss_bytes"] / 1e9, r["model"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, m in pts:
            ax.annotate(m, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    xmax = max((r["checkpoint_bytes"] / 1e9 for r in rows), default=1) * 1.1
    ax.plot([0, xmax], [GOAL_GB, xmax + GOAL_GB], "k--", lw=1, label=f"goal: checkpoint + {GOAL_GB:g} GB")
    for times in sorted(set(GOAL_TIMES.values())):
        ax.plot([0, xmax], [0, times * xmax], "k:", lw=1,
                label=f"goal of {', '.join(t for t, x in GOAL_TIMES.items() if x == times)}: {times:g}x the checkpoint")
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, None)
    ax.set_xlabel("bf16 checkpoint on disk, GB (10^9 bytes)")
    ax.set_ylabel("export peak RSS, GB")
    dates = sorted({r["date"] for r in rows})
    cpu = rows[0]["machine"].split(",")[0] if rows else ""
    ax.set_title(f"export peak memory against model size\n{cpu}, {', '.join(dates)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


def draw(rows: list[dict]) -> None:
    """The plot, in this Python if it has matplotlib, else in benchmarks/.venvs/plots."""
    import importlib.util

    if importlib.util.find_spec("matplotlib"):
        return plot(rows, PLOT)
    if not PLOTS_PY.exists():
        print(f"no plot: matplotlib is not in this Python nor in {PLOTS_PY} (python -m venv it; pip install matplotlib)")
        return
    subprocess.run([PLOTS_PY, __file__, "--plot-only"], check=True)


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: s.split(","), default=DEFAULT_MODELS,
                    help=f"comma-separated, from {', '.join(big_checkpoints.CONFIGS)} (default: the three 1-3B)")
    ap.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t], default=["onnx", "executorch"],
                    help="slm-export targets, comma-separated (coreml too); empty: llama.cpp alone")
    ap.add_argument("--export-flags", default="--bits 4", help="our export's flags (default: '--bits 4')")
    ap.add_argument("--llamacpp", action=argparse.BooleanOptionalAction, default=True,
                    help="llama.cpp's convert + Q4_0 beside ours (default: on)")
    ap.add_argument("--bench", action="store_true", help="also decode tok/s of each artifact (slow at 3B)")
    ap.add_argument("--threads", type=int, default=2, help="--bench threads (default: 2)")
    ap.add_argument("--work", type=Path, default=HERE / ".work", help="checkpoints and artifacts (default: benchmarks/.work)")
    ap.add_argument("--plot-only", action="store_true", help="measure nothing: draw the plot from the results")
    ap.add_argument("--report", action="store_true", help="measure nothing: rewrite the report and the plot from the results")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text()), PLOT)
        return 0
    if args.report:
        write_report(json.loads(RESULTS.read_text()))
        draw(json.loads(RESULTS.read_text()))
        return 0
    unknown = [m for m in args.models if m not in big_checkpoints.CONFIGS]
    if unknown:
        print(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(big_checkpoints.CONFIGS)}", file=sys.stderr)
        return 2
    flags = shlex.split(args.export_flags)
    stamp, where = time.strftime("%Y-%m-%d"), machine()
    rows = []
    for name in args.models:
        ckpt, built = checkpoint(name, args.work.resolve())
        facts = {"model": name, **checkpoint_facts(ckpt), "build": built}
        if built:
            print(f"built {name}: {json.dumps(built)}", flush=True)
        made = [{**export_ours(ckpt, t, flags, args.work.resolve() / "artifacts" / name / t), "flags": args.export_flags}
                for t in args.targets]
        made += [export_llamacpp(ckpt, args.work.resolve() / "artifacts" / name / "llamacpp")] if args.llamacpp else []
        for row in made:
            row.update(facts, date=stamp, machine=where)
            if args.bench and row["exit"] == 0:
                row.update(bench(row, ckpt, args.threads))
            print(json.dumps({k: v for k, v in row.items() if k not in ("machine",)}), flush=True)
            rows.append(row)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    key = lambda r: (r["model"], r["system"], r.get("flags"))  # noqa: E731
    keep = [o for o in old if not any(key(o) == key(n) for n in rows)]
    for r in rows:  # a reused checkpoint keeps the builder's figures from when it was built
        r["build"] = r["build"] or next((o["build"] for o in old if o["model"] == r["model"] and o.get("build")), None)
    RESULTS.write_text(json.dumps(keep + rows, indent=1) + "\n")
    write_report(keep + rows)
    draw(keep + rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
