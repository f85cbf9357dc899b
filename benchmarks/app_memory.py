"""What an app pays in memory for a .pte: the export's own C++ example, in a process of its own.

    .venv/bin/python benchmarks/app_memory.py                  # exports SmolLM2-135M int4 twice (~9 min)
    .venv/bin/python benchmarks/app_memory.py EXPORT_DIR ...   # ExecuTorch exports you already have

`slm-export bench` measures a runtime inside Python (its peak RSS holds the interpreter and numpy). Here
each export's `cpp/generate.cpp` is built with the command its README gives (ExecuTorch's Module API,
slm-export's kernels and app_memory.h) and run alone: a 32-token prompt and one token, a 512-token prompt
and one token, a 512-token prompt and 128 tokens (the shipped passage), `--runs` times each. Peak RSS is
the child's ru_maxrss from wait4 (VmHWM; this parent imports no torch, so the value a vforked child
inherits at exec stays below any model's). The same program is also built on ExecuTorch's Module
defaults (its own arenas, no page dropping, a workspace per layer) for comparison.

Writes benchmarks/app_memory.json and benchmarks/APP_MEMORY.md. Ratios divide bytes by bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slm_export.devices.local import describe  # noqa: E402
from slm_export.exporters.executorch.handoff import CPP_DIR, CPP_EXAMPLE, cpp_build_command  # noqa: E402
from slm_export.text import TextCodec, passage_ids  # noqa: E402

CASES = ((32, 1), (512, 1), (512, 128))  # (prompt tokens, generated tokens)
DEFAULT_EXPORTS = (("int4", ["--bits", "4"]), ("int4 --embedding-bits 8", ["--bits", "4", "--embedding-bits", "8"]))


def module_defaults(source: str) -> str:
    """generate.cpp without app_memory.h's choices: what ExecuTorch's Module does left alone."""
    edits = (("  if (slm::share_xnnpack_workspace() != Error::Ok) return 1;\n", ""),
             ('!arenas.reserve(module, {"forward"}) || module.load_method("forward", arenas.allocator()) != Error::Ok',
              'module.load_method("forward") != Error::Ok'),
             ("  file.drop();", ""))
    for old, new in edits:
        if old not in source:
            raise RuntimeError(f"{CPP_EXAMPLE} changed ({old.strip()!r} is gone): update module_defaults() to match it")
        source = source.replace(old, new)
    return source


def build(folder: Path, work: Path, source: str, name: str) -> Path:
    (work / CPP_DIR).mkdir(exist_ok=True)
    for f in (folder / CPP_DIR).iterdir():
        (work / CPP_DIR / f.name).write_text(f.read_text())
    (work / CPP_EXAMPLE).write_text(source)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `python` is this venv's
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", cpp_build_command()], cwd=work, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"building {CPP_EXAMPLE} of {folder} failed:\n{p.stderr[-2000:]}")
    return (work / "generate").rename(work / name)


def peak_rss(binary: Path, pte: Path, prompt: list[int], new_tokens: int) -> tuple[int, str | None]:
    """(peak RSS in bytes, error or None) of one run."""
    with tempfile.TemporaryFile("w+") as ids, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        ids.write(" ".join(map(str, prompt)))
        ids.seek(0)
        proc = subprocess.Popen([str(binary), str(pte), str(new_tokens)], stdin=ids, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Popen.wait would discard it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        generated, log = out.read().split(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        return 0, f"exit {proc.returncode}: {log[-500:]}"
    if len(generated) != new_tokens:
        return 0, f"generated {len(generated)} tokens, expected {new_tokens}"
    return usage.ru_maxrss * 1024, None


def measure(folder: Path, label: str, runs: int) -> list[dict]:
    folder = folder.resolve()
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("target") != "executorch" or not (folder / CPP_EXAMPLE).is_file():
        raise SystemExit(f"{folder} is not an ExecuTorch export with {CPP_EXAMPLE}: export with --target executorch")
    ids = passage_ids(TextCodec(folder, manifest))
    pte = folder / manifest["model_file"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = (folder / CPP_EXAMPLE).read_text()
        for program, src in (("cpp/generate.cpp (app_memory.h)", source), ("Module defaults", module_defaults(source))):
            binary = build(folder, Path(tmp), src, "generate" if program.startswith("cpp") else "stock")
            for prompt_tokens, new_tokens in CASES:
                samples = [peak_rss(binary, pte, ids[:prompt_tokens], new_tokens) for _ in range(runs)]
                errors = [e for _, e in samples if e]
                peaks = [b for b, e in samples if not e]
                peak = statistics.median(peaks) if peaks else None
                rows.append({"export": label, "folder": str(folder), "program": program, "pte_bytes": pte.stat().st_size,
                             "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                             "peak_rss_mb": peak and round(peak / 1e6, 1),
                             "ratio_to_pte": peak and round(peak / pte.stat().st_size, 3),
                             "samples_peak_rss_bytes": peaks, "error": errors[0] if errors else None})
                print(f"{label:<26} {program:<32} {prompt_tokens:>4}+{new_tokens:<4} "
                      f"{rows[-1]['peak_rss_mb'] or 'FAILED'} MB  {rows[-1]['ratio_to_pte'] or rows[-1]['error']}", flush=True)
    return rows


def _isa() -> list[str]:
    """The vector extensions that decide XNNPACK's kernels (AVX-512 and VNNI, or AVX2 only)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]


def markdown(result: dict) -> str:
    lines = [f"# App-process memory of ExecuTorch exports\n",
             f"Produced by `.venv/bin/python benchmarks/app_memory.py`, {result['date']}, {result['runs']} runs per row "
             f"(median shown). Machine: {result['machine'].get('cpu', '?')} ({', '.join(result['machine']['isa']) or '?'}), "
             f"{result['machine'].get('cores', '?')} cores, {result['machine'].get('memory_gb', '?')} GB.\n",
             "| export | .pte MB | program | prompt + new tokens | peak RSS MB | x the .pte |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['export']} | {r['pte_bytes'] / 1e6:.1f} | {r['program']} | {r['prompt_tokens']} + "
                     f"{r['new_tokens']} | {r['peak_rss_mb'] or 'FAILED: ' + str(r['error'])[:120]} | "
                     f"{r['ratio_to_pte'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exports", nargs="*", type=Path, help="ExecuTorch export folders (default: export SmolLM2-135M int4)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE, help="where app_memory.json and APP_MEMORY.md go")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exports = [(str(f), f) for f in args.exports]
        for label, flags in ([] if exports else DEFAULT_EXPORTS):
            out = Path(tmp) / label.replace(" ", "_")
            print(f"exporting the bundled model: slm-export --target executorch {' '.join(flags)}", flush=True)
            subprocess.run([sys.executable, "-m", "slm_export.cli", "--target", "executorch", *flags, "--out", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            exports.append((label, out))
        for label, folder in exports:
            rows += measure(folder, label, args.runs)
    result = {"schema_version": 1, "date": started, "runs": args.runs, "machine": {**describe(), "isa": _isa()},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "app_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "APP_MEMORY.md").write_text(markdown(result))
    print(f"wrote {args.out / 'app_memory.json'} and {args.out / 'APP_MEMORY.md'}")
    return result


if __name__ == "__main__":
    main()
