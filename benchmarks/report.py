"""The benchmark's outputs: results.json (every row), RESULTS.md (tables, goals, machine, versions), plots."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from common import PeerError, ensure_venv
from slm_export.devices.local import describe
from slm_export.manifest import library_versions
from slm_export.results import SCHEMA_VERSION, BenchResult, format_markdown

PLOTS = Path(__file__).resolve().with_name("plots.py")


def _f(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _row(rows: list[BenchResult], prompt: int) -> BenchResult | None:
    return next((r for r in rows if r.prompt_tokens == prompt), None)


def headline(rows: list[BenchResult], prompts: list[int]) -> list[str]:
    """One line per model and system: export, size, speed at each prompt length, memory, quality."""
    short, long_ = prompts[0], prompts[-1]
    lines = [f"| model | system | size MB | export s | export peak RSS MB | load s | TTFT ms ({short} / {long_}) | "
             f"prefill tok/s ({long_}) | decode tok/s ({short}): median (min-max) | decode tok/s ({long_}) | "
             f"peak RSS MB ({short}) | GB/s | KL vs fp32 | top-1 vs fp32 |", "|" + "---|" * 14]
    for (model, system) in dict.fromkeys((r.model, r.system) for r in rows):
        mine = [r for r in rows if r.model == model and r.system == system]
        a, b = _row(mine, short), _row(mine, long_)
        err = next((r.error for r in mine if r.error), None)
        first = a or b or mine[0]
        if err and not (a and a.decode_tok_s):
            lines.append(f"| {model} | {system} | {_f(first.artifact_mb)} | {_f(first.export_s, '{:.0f}')} | "
                         f"{_f(first.export_peak_rss_mb, '{:.0f}')} | FAILED: {err[:200]} |" + " |" * 8)
            continue
        kl = "reference" if first.runtime == "PyTorch eager" and first.mean_kl is None else _f(first.mean_kl, "{:.4f}")
        lines.append(
            f"| {model} | {system} | {_f(first.artifact_mb)} | {_f(first.export_s, '{:.0f}')} | "
            f"{_f(first.export_peak_rss_mb, '{:.0f}')} | {_f(first.load_s, '{:.2f}')} | "
            f"{_f(a and a.ttft_ms, '{:.0f}')} / {_f(b and b.ttft_ms, '{:.0f}')} | {_f(b and b.prefill_tok_s, '{:.0f}')} | "
            f"**{_f(a and a.decode_tok_s)}** ({_f(a and a.decode_tok_s_min)}-{_f(a and a.decode_tok_s_max)}) | "
            f"{_f(b and b.decode_tok_s)} | {_f(a and a.peak_rss_mb, '{:.0f}')} | {_f(a and a.decode_gb_s)} | {kl} | "
            f"{_f(first.top1_agreement, '{:.3f}')} |")
    return lines


def _fastest(rows: list[BenchResult], model: str, prompt: int, pred) -> BenchResult | None:
    ok = [r for r in rows if r.model == model and r.prompt_tokens == prompt and r.decode_tok_s and not r.error and pred(r)]
    return max(ok, key=lambda r: r.decode_tok_s, default=None)


def per_round(a: BenchResult, b: BenchResult) -> str:
    """The same ratio within each timing round: both sides ran minutes apart, so a slow spell of this shared
    VM hits both; the spread says how much of the median ratio is noise."""
    xs, ys = a.samples.get("rounds_decode_tok_s") or [], b.samples.get("rounds_decode_tok_s") or []
    pairs = [x / y for x, y in zip(xs, ys) if x and y]
    if len(pairs) < 2 or len(xs) != len(ys):
        return ""
    return f"; per round {', '.join(f'{p:.2f}' for p in pairs)}"


def goals(rows: list[BenchResult], prompts: list[int]) -> list[str]:
    """Issue #6's goals as ratios of this run: best >= 1.3x llama.cpp, every target >= 1.0x, >= same-format peers."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        out.append(f"\n**{model}**\n")
        for p in prompts:
            def fast(pred, m=model, p=p):
                return _fastest(rows, m, p, pred)

            llama = fast(lambda r: r.runtime == "llama.cpp")
            ours = {t: fast(lambda r, t=t: r.system.startswith(f"slm-export {t} ")) for t in ("onnx", "executorch")}
            best = max((r for r in ours.values() if r), key=lambda r: r.decode_tok_s, default=None)

            def ratio(a, b, goal):
                if not (a and b):
                    return "not measured (a side failed or was not run)"
                x = a.decode_tok_s / b.decode_tok_s
                return (f"{a.decode_tok_s:.1f} / {b.decode_tok_s:.1f} = **{x:.2f}x** "
                        f"({'met' if x >= goal else 'MISSED'}, goal >= {goal}x){per_round(a, b)}")
            lab = lambda r: r.system if r else "-"  # noqa: E731
            out.append(f"- {p}-token prompt, decode: best slm-export ({lab(best)}) vs fastest llama.cpp ({lab(llama)}): "
                       f"{ratio(best, llama, 1.3)}")
            for t, r in ours.items():
                out.append(f"  - {t} ({lab(r)}) vs llama.cpp: {ratio(r, llama, 1.0)}")
            for t, peer in (("onnx", "onnxruntime-genai"), ("onnx", "optimum-onnx"), ("executorch", "optimum-executorch")):
                other = fast(lambda r, peer=peer: r.runtime == peer)
                out.append(f"  - {t} vs {peer} ({lab(other)}): {ratio(ours[t], other, 1.0)}")
            # Not one of the goals: the same output-layer precision on both sides. llama.cpp's
            # Q4_0 and Q8_0 files keep the output tensor at Q8_0 (our plain int4 rows quantize it to int4).
            head8 = fast(lambda r: r.system.startswith("slm-export") and "-head8" in r.system)
            q4_0 = fast(lambda r: r.system == "llama.cpp Q4_0")
            if head8 and q4_0:
                kl = "" if head8.mean_kl is None or q4_0.mean_kl is None else \
                    f"; KL vs fp32 {head8.mean_kl:.3f} against {q4_0.mean_kl:.3f}"
                out.append(f"  - like for like, both output layers int8 ({lab(head8)} vs {lab(q4_0)}): "
                           f"{head8.decode_tok_s:.1f} / {q4_0.decode_tok_s:.1f} = {head8.decode_tok_s / q4_0.decode_tok_s:.2f}x{kl}")
    return out


def draw_plots(out: Path, results_json: Path) -> list[str]:
    """PNGs drawn by plots.py in a small venv with matplotlib (kept out of slm-export's dependencies)."""
    try:
        py = ensure_venv("plots", [["matplotlib"]], check="import matplotlib")
    except PeerError as e:
        return [f"plots not drawn: {e}"]
    r = subprocess.run([str(py), str(PLOTS), str(results_json), str(out / "plots")], capture_output=True, text=True)
    if r.returncode != 0:
        return [f"plots not drawn: {r.stderr.strip().splitlines()[-1:]}"]
    return r.stdout.split()


def write(out: Path, rows: list[BenchResult], args, *, started: str, command: str, minutes: float,
          plots: bool = True, progress: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    m = describe()
    versions = library_versions("onnxruntime", "executorch", "torchao", "torch", "transformers")
    peer_versions = {}
    for r in rows:
        if not r.system.startswith("slm-export") and r.versions:
            peer_versions.setdefault(r.runtime, r.versions)
    results_json = out / "results.json"
    results_json.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "date": started, "command": command,
                                        "minutes": round(minutes, 1), "machine": m, "versions": versions,
                                        "peer_versions": peer_versions, "results": [r.to_dict() for r in rows]}, indent=1))
    pngs = draw_plots(out, results_json) if plots else ["plots not drawn (--no-plots)"]
    images = [f"![{Path(p).stem}](plots/{Path(p).name})" for p in pngs if p.endswith(".png")]
    notes = [p for p in pngs if not p.endswith(".png")]
    text = (
        f"# Benchmark results\n\nProduced by `{command}`, started {started}, {minutes:.0f} minutes in one sitting{progress}.\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, Python {m['python']}"
        f"{'; SIMD: ' + ' '.join(m['simd']) if m.get('simd') else ''}; "
        f"{args.threads} threads for every system.\n\n"
        "Models: smollm2-135m = SmolLM2-135M-Instruct (the bundled GGUF, dequantized to a Hugging Face folder that "
        "every system exports from); smollm2-360m-random and qwen2.5-0.5b-random = the real configs with random "
        "weights (speed does not depend on the values; no quality figures for them).\n\n"
        f"Protocol: prompts of {' and '.join(map(str, args.prompt_tokens))} tokens of the shipped passage, one process "
        f"per system and prompt; TTFT = median of 3 (prompt ids in, first greedy id out); decode = median (min-max) of "
        f"{args.decode_tokens} single-token greedy steps after 8 warm-up steps; {args.rounds} round(s) alternating all "
        "systems, the median round reported (every round in results.json). Export s and export peak RSS = the whole "
        "export command (model load included) and its children. Peak RSS = VmHWM of the measuring process: Python, "
        "the runtime and the model, no tokenizer; only PyTorch eager and optimum-executorch (run by ExecuTorch's pip "
        "bindings, which link libtorch) hold torch; slm-export's .pte runs in its torch-free C++ runner. GB/s = weight bytes read per token x decode tok/s (slm-export: from its quant "
        "report; peers: the file size). Quality = teacher-forced logits on the first "
        f"{args.quality_tokens} tokens of the passage against PyTorch eager fp32: mean KL(fp32 || system) and top-1 "
        "agreement.\n\n## Headline\n\n" + "\n".join(headline(rows, args.prompt_tokens)) +
        "\n\n## Against the goals (issue #6)\n" + "\n".join(goals(rows, args.prompt_tokens)) + "\n\n## Plots\n\n" +
        "\n\n".join(images + notes) + "\n\n## Every row\n\n" + format_markdown(rows) +
        f"\n\n## Versions\n\nslm-export's venv: {json.dumps(versions)}\n\n" +
        "\n".join(f"- {k}: {json.dumps(v)}" for k, v in peer_versions.items()) + "\n")
    (out / "RESULTS.md").write_text(text)
    print("\n".join(headline(rows, args.prompt_tokens)))
    print("\n".join(goals(rows, args.prompt_tokens)))
    print(f"wrote {out / 'RESULTS.md'}, {results_json} and {len(images)} plots")
