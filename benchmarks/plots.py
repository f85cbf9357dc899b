"""Draw the benchmark's plots from results.json; runs in benchmarks/.venvs/plots (matplotlib).

    python plots.py results.json OUT_DIR      -> prints the PNG paths it wrote
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"slm-export": "tab:blue", "llama.cpp": "tab:orange", "onnxruntime-genai": "tab:green",
          "optimum-onnx": "tab:olive", "optimum-executorch": "tab:purple", "PyTorch eager": "tab:gray"}


def family(r: dict) -> str:
    return "slm-export" if r["system"].startswith("slm-export") else r["runtime"]


def caption(data: dict) -> str:
    m = data["machine"]
    return f"{m['cpu']}, {m['cores']} cores, {data['date']}"


def main() -> int:
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    prompt = min(r["prompt_tokens"] for r in data["results"] if r["prompt_tokens"])
    ok = [r for r in data["results"] if r["prompt_tokens"] == prompt and r["decode_tok_s"] and not r["error"]]
    model_names = list(dict.fromkeys(r["model"] for r in ok))
    written = []

    # 1. decode tok/s per system, one panel per model; the machine and date above the panels
    fig, axes = plt.subplots(1, len(model_names), figsize=(6.5 * len(model_names), 0.45 * max(
        sum(r["model"] == m for r in ok) for m in model_names) + 2.0), squeeze=False)
    for ax, m in zip(axes[0], model_names):
        rows = sorted((r for r in ok if r["model"] == m), key=lambda r: r["decode_tok_s"])
        ax.barh([r["system"] for r in rows], [r["decode_tok_s"] for r in rows],
                xerr=[[r["decode_tok_s"] - r["decode_tok_s_min"] for r in rows],
                      [r["decode_tok_s_max"] - r["decode_tok_s"] for r in rows]],
                color=[COLORS.get(family(r), "black") for r in rows], capsize=2)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("tokens/s (median; whiskers min-max)")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"decode tok/s after a {prompt}-token prompt\n{caption(data)}", fontsize=10)
    fig.tight_layout()
    written.append(out / "decode_tok_s.png")
    fig.savefig(written[-1], dpi=110)

    # 2. decode tok/s against artifact size: numbered points, the numbers listed beside the plot (no
    # overlapping labels however close the points are)
    fig, (ax, key) = plt.subplots(1, 2, figsize=(14, max(6.5, 0.14 * len(ok) + 1)), gridspec_kw={"width_ratios": [3, 2]})
    markers = dict(zip(model_names, "os^Dv"))
    listing = []
    for i, r in enumerate(sorted(ok, key=lambda r: (r["model"], -r["decode_tok_s"])), 1):
        ax.scatter(r["artifact_mb"], r["decode_tok_s"], color=COLORS.get(family(r), "black"), marker=markers[r["model"]])
        ax.annotate(str(i), (r["artifact_mb"], r["decode_tok_s"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        listing.append(f"{i:>2}  {r['system']}" + (f"  [{r['model']}]" if len(model_names) > 1 else ""))
    for fam, c in COLORS.items():
        ax.scatter([], [], color=c, label=fam)
    for m, mk in markers.items():
        ax.scatter([], [], color="black", marker=mk, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("artifact size, MB (10^6 bytes, log)")
    ax.set_ylabel(f"decode tok/s ({prompt}-token prompt)")
    ax.set_title(f"speed against size\n{caption(data)}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    key.axis("off")
    key.text(0, 1, "\n".join(listing), va="top", ha="left", family="monospace",
             fontsize=7, transform=key.transAxes)
    fig.tight_layout()
    written.append(out / "tok_s_vs_size.png")
    fig.savefig(written[-1], dpi=110)
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
