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


def main() -> int:
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    prompt = min(r["prompt_tokens"] for r in data["results"] if r["prompt_tokens"])
    ok = [r for r in data["results"] if r["prompt_tokens"] == prompt and r["decode_tok_s"] and not r["error"]]
    model_names = list(dict.fromkeys(r["model"] for r in ok))
    written = []

    # 1. decode tok/s per system, one panel per model
    fig, axes = plt.subplots(1, len(model_names), figsize=(6 * len(model_names), 0.45 * max(
        sum(r["model"] == m for r in ok) for m in model_names) + 1.5), squeeze=False)
    for ax, m in zip(axes[0], model_names):
        rows = sorted((r for r in ok if r["model"] == m), key=lambda r: r["decode_tok_s"])
        ax.barh([r["system"] for r in rows], [r["decode_tok_s"] for r in rows],
                xerr=[[r["decode_tok_s"] - r["decode_tok_s_min"] for r in rows],
                      [r["decode_tok_s_max"] - r["decode_tok_s"] for r in rows]],
                color=[COLORS.get(family(r), "black") for r in rows], capsize=2)
        ax.set_title(f"{m}: decode tok/s ({prompt}-token prompt)")
        ax.set_xlabel("tokens/s (median; whiskers min-max)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    written.append(out / "decode_tok_s.png")
    fig.savefig(written[-1], dpi=110)

    # 2. decode tok/s against artifact size
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(model_names, "os^Dv"))
    for r in ok:
        ax.scatter(r["artifact_mb"], r["decode_tok_s"], color=COLORS.get(family(r), "black"), marker=markers[r["model"]])
        short = r["system"].replace("slm-export ", "").replace("onnxruntime-genai", "ort-genai")
        ax.annotate(short, (r["artifact_mb"], r["decode_tok_s"]), fontsize=5, xytext=(3, 2), textcoords="offset points")
    for fam, c in COLORS.items():
        ax.scatter([], [], color=c, label=fam)
    for m, mk in markers.items():
        ax.scatter([], [], color="black", marker=mk, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("artifact size, MB (log)")
    ax.set_ylabel(f"decode tok/s ({prompt}-token prompt)")
    ax.set_title(f"speed against size ({data['machine']['cores']} cores, {data['date']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "tok_s_vs_size.png")
    fig.savefig(written[-1], dpi=110)
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
