"""What an export needs in memory at its peak: measured, against the estimate slm-export refuses on.

    .venv/bin/python benchmarks/export_memory.py                          # bundled model, every target at 4/8/16 bits
    .venv/bin/python benchmarks/export_memory.py --model DIR --targets onnx,executorch --bits 4
    .venv/bin/python benchmarks/export_memory.py --cgroup 1G              # the refusal and the kill, for real

Each export is the CLI command a user types (`python -m slm_export.cli --target T --bits B --out DIR
--skip-memory-check`, so none is refused), one process each; its peak RSS is the child's ru_maxrss from
wait4 (VmHWM of the export process; this parent imports no torch). The estimate is the one the export
makes before loading (slm_export.memory's arithmetic on the declared facts, from the model's config): for
a model that streams (a safetensors folder, a GGUF file of a streamed architecture, the bundled model
among them) `streamed_peak_bytes`, else `export_base_mb` + `export_peak` (or `CALIBRATION_PEAK`) per fp32 byte. Appends to benchmarks/export_memory.json
and rewrites benchmarks/EXPORT_MEMORY.md from it.

--cgroup SIZE: needs root and a writable cgroup file system (v2, or v1's memory controller). Makes a
memory cgroup of SIZE under this process's own, and in it runs the ExecuTorch int4 export of the
bundled model: it must be refused up front (exit 2, one line naming the cgroup limit); then the same
with --skip-memory-check, which the kernel kills (SIGKILL: no message can be printed); then an export
beside it outside the cgroup, which must say that the killed run's partial folder was removed and why.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "export_memory.json"
REPORT = HERE / "EXPORT_MEMORY.md"
CLI = [sys.executable, "-m", "slm_export.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(args: list, cgroup: Path | None = None) -> tuple[int, str, int]:
    """(exit status as a shell shows it, output, peak RSS bytes) of one CLI run."""
    def enter():  # in the child, before exec: join the cgroup, so the whole export is inside its limit
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    p = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=ENV, cwd=ROOT, preexec_fn=enter if cgroup else None)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    code = p.returncode if p.returncode >= 0 else 128 - p.returncode
    return code, out, usage.ru_maxrss * 1024


def estimate(model: str | None, target: str, bits: int, extra: list[str], fp32_bytes: int | None = None) -> dict:
    """The declared facts' estimate for this export (in a child: this parent stays torch-free), from the
    model's config, or from `fp32_bytes` when given."""
    code = ("import json, sys\n"
            "from slm_export.fit import shape_before_loading\n"
            "from slm_export.loading import streamable\n"
            "from slm_export.exporters import TARGETS\n"
            "from slm_export.memory import estimate_export, fp32_weight_bytes\n"
            "from slm_export.quantize import QuantSpec\n"
            "from slm_export.quantize.spec import resolve_spec\n"
            "model, target, bits, method, mixed, fp32 = json.loads(sys.argv[1])\n"
            "shape = shape_before_loading(model)\n"
            "fp32 = fp32 or fp32_weight_bytes(shape)\n"
            "ex = TARGETS.get(target)()\n"
            "spec = resolve_spec(ex, QuantSpec(bits=bits, method=method, mixed_precision=mixed))\n"
            "precision, kv = ex.resolve_precision(None, None)\n"
            "e = estimate_export(ex, spec, kv, fp32, '', shape, streamable(model))  # as the export estimates it\n"
            "print(json.dumps({'fp32_bytes': e.fp32_bytes, 'peak_bytes': e.peak_bytes}))\n")
    method = extra[extra.index("--quant-method") + 1] if "--quant-method" in extra else None
    mixed = float(extra[extra.index("--mixed-precision") + 1]) if "--mixed-precision" in extra else None
    r = subprocess.run([sys.executable, "-c", code, json.dumps([model, target, bits, method, mixed, fp32_bytes])], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(models: list, targets: list, bits_list: list, extra: list[str], work: Path) -> list[dict]:
    rows = []
    for model in models:
        for target in targets:
            for bits in bits_list:
                out = work / f"{target}-{bits}"
                args = ["--target", target, "--bits", bits, *extra, "--out", out, "--force", "--skip-memory-check"]
                t = time.perf_counter()
                code, output, peak = run([*args, *(["--model", model] if model else [])])
                wall = time.perf_counter() - t
                est = estimate(model, target, bits, extra)
                row = {"model": Path(model).name if model else "smollm2-135m-instruct (bundled GGUF)",
                       "model_arg": str(Path(model).resolve()) if model else None, "target": target,
                       "bits": bits, "options": " ".join(extra),
                       "exit": code, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20),
                       "fp32_mb": round(est["fp32_bytes"] / 2**20), "estimate_mb": round(est["peak_bytes"] / 2**20),
                       "error_pct": round(100 * (est["peak_bytes"] / peak - 1), 1) if code == 0 else None,
                       "failure": None if code == 0 else output.strip().splitlines()[-1][:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def machine() -> str:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.1f} GiB, Linux {platform.release()}, Python {platform.python_version()}"


def write_report(rows: list[dict]) -> None:
    lines = ["# Export peak memory: measured against the estimate", "",
             "Written by `benchmarks/export_memory.py` (see its docstring for the method). Memory here is MiB (2^20 bytes), as measured in this sitting; slm-export itself prints MB (10^6 bytes). The estimate is "
             "what `slm-export` compares with the memory it finds before loading the model (exit 2 when it is "
             "larger); error = estimate / measured - 1. Models: the bundled SmolLM2-135M-Instruct GGUF; "
             "qwen2.5-0.5b-random = benchmarks/models.py's Qwen2.5-0.5B config with random weights (an HF "
             "folder). Options: defaults = the default flags (GPTQ; at 4 bits mixed precision 0.25 too). Each row is the code of "
             "its date: the 2026-12-06 qwen rows loaded the model whole (before checkpoints streamed); `--report` "
             "recomputes only the estimates of rows whose model it can read again. The "
             "bases (`export_base_mb`) are the peak RSS of a tiny model's int4 export: ONNX 439, ExecuTorch "
             "497, Core ML 576 MiB (`/usr/bin/time -f %M`). Export s is not a timing benchmark (other work shared "
             "the cores).", "",
             "| date | machine | model | target | bits | options | fp32 weights MiB | measured peak RSS MiB | estimate MiB | error | export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['error_pct']:+.0f}%" if r["error_pct"] is not None else f"FAILED: {r['failure']}"
        lines.append(f"| {r['date']} | {r['machine']} | {r['model']} | {r['target']} | {r['bits']} | "
                     f"{r.get('options') or 'defaults'} | {r['fp32_mb']} | "
                     f"{r['peak_rss_mb']} | {r['estimate_mb']} | {err} | {r['wall_s']} |")
    REPORT.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- a real memory cgroup

def make_cgroup(size: int) -> Path:
    """A new memory cgroup limited to `size` bytes, under this process's own (v2, else v1)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            base, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(",") and Path("/sys/fs/cgroup/memory").is_dir():
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            base, limit_file = (base if base.is_dir() else Path("/sys/fs/cgroup/memory")), "memory.limit_in_bytes"
        else:
            continue
        group = base / f"slm-export-memory-check-{os.getpid()}"
        group.mkdir()
        (group / limit_file).write_text(str(size))
        if limit_file == "memory.limit_in_bytes" and (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(size))  # no escape into swap
        return group
    raise SystemExit("no writable memory cgroup here (needs root and cgroup v2, or v1's memory controller)")


def cgroup_check(size: int) -> int:
    group = make_cgroup(size)
    failures = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "et-int4"
            args = ["--target", "executorch", "--bits", "4", "--out", out]
            code, output, _ = run(args, group)
            print(f"$ slm-export {' '.join(map(str, args))}   # in a {size / 2**30:.1f} GiB cgroup\n{output.strip()}\n(exit {code})\n")
            lines = [line for line in output.strip().splitlines() if line.strip()]
            if code != 2 or len(lines) != 1 or "cgroup limit" not in lines[0] or any(Path(tmp).iterdir()):
                failures.append("the export was not refused up front with one line naming the cgroup limit")
            code, output, _ = run([*args, "--skip-memory-check"], group)
            print(f"$ slm-export ... --skip-memory-check   # same cgroup\n{output.strip()[-600:]}\n(exit {code})\n")
            partials = [p for p in Path(tmp).iterdir() if ".partial" in p.name]
            if code != 128 + signal.SIGKILL:
                failures.append(f"--skip-memory-check: expected the kernel to kill the export (exit 137), got {code}")
            elif len(partials) != 1:
                failures.append(f"the killed export left {len(partials)} partial folders, expected 1")
            code, output, _ = run(["--target", "onnx", "--bits", "16", "--out", Path(tmp) / "next", "--max-context", "64"])
            swept = [line for line in output.splitlines() if line.startswith("removed ")]
            print(f"$ slm-export --target onnx --bits 16 --out next   # no cgroup\n{swept[0] if swept else output[-600:]}\n(exit {code})\n")
            if not swept or "lack of memory" not in swept[0]:
                failures.append("the next export did not say the killed run's partial was removed for lack of memory")
    finally:
        group.rmdir()
    print("cgroup check: " + ("passed" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="a model folder or .gguf (repeatable); default: the bundled model")
    ap.add_argument("--targets", type=lambda s: s.split(","), default=["onnx", "executorch", "coreml"])
    ap.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16])
    ap.add_argument("--extra", default="", help="more export options, e.g. '--quant-method rtn --mixed-precision 0' "
                    "(only those two reach the estimate)")
    ap.add_argument("--report", action="store_true",
                    help="measure nothing: recompute the estimates of the stored rows (after changing a factor) and rewrite the report")
    ap.add_argument("--cgroup", default=None, metavar="SIZE", help="run the cgroup check at this limit (e.g. 1G) instead")
    args = ap.parse_args()
    if args.cgroup:
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        size = int(float(args.cgroup.rstrip("KMGkmg")) * units.get(args.cgroup[-1].upper(), 1))
        return cgroup_check(size)
    if args.report:
        rows = json.loads(RESULTS.read_text())
        for r in rows:
            if "model_arg" not in r or (r["model_arg"] and not Path(r["model_arg"]).exists()):
                continue  # its model cannot be read again (or was not recorded): the estimate made then stays
            est = estimate(r["model_arg"], r["target"], r["bits"], shlex.split(r.get("options", "")), r["fp32_mb"] * 2**20)
            r["estimate_mb"] = round(est["peak_bytes"] / 2**20)
            r["error_pct"] = round(100 * (r["estimate_mb"] / r["peak_rss_mb"] - 1), 1) if r["exit"] == 0 else None
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        write_report(rows)
        return 0
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args.model or [None], args.targets, args.bits, shlex.split(args.extra), Path(work))
    stamp, where = time.strftime("%Y-%m-%d"), machine()
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    new = [{**r, "date": stamp, "machine": where} for r in rows]
    key = lambda r: (r["model"], r["target"], r["bits"], r.get("options", ""))  # noqa: E731
    keep = [o for o in old if not any(key(o) == key(n) for n in new)]
    RESULTS.write_text(json.dumps(keep + new, indent=1) + "\n")
    write_report(keep + new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
