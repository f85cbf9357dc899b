"""One results schema for every target and device (in the manner of llama-bench).

One flat field list with units in the names; raw samples kept; a failed run is a row with its
`error` set, never dropped. Printers: table (terminal), markdown, JSON, CSV, JSON lines.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

SCHEMA_VERSION = 5  # 2: simulated, device_peak_gb_s, predicted_decode_tok_s; 3: emulated; 4: export_*, quality; 5: memory in MB (10^6 bytes), was MiB


@dataclass
class BenchResult:
    system: str  # what ran, e.g. "slm-export onnx int4-g32-sym-a8" or "llama.cpp Q4_0"
    model: str
    target: str = ""
    runtime: str = ""  # what ran it: the artifact's own (slm-export's runner) or a stock one (bench --runtime)
    device: str = "local"
    simulated: bool = False  # measured here under another device's limits: the timings are this machine's
    # The device's CPU emulated (QEMU) running its real runtime build, e.g. "qemu-aarch64 7.2.22 -cpu cortex-a76".
    # Such a row has no timings (they would be QEMU's): raw emulated samples are in `samples`.
    emulated: str | None = None
    quant: str = ""
    artifact_mb: float | None = None
    threads: int | None = None
    load_s: float | None = None
    prompt_tokens: int | None = None
    ttft_ms: float | None = None  # median time from prompt ids in to first generated id out
    prefill_tok_s: float | None = None
    decode_tokens: int | None = None
    decode_tok_s: float | None = None  # median over timed steps, after warm-up
    decode_tok_s_min: float | None = None
    decode_tok_s_max: float | None = None
    decode_gb_s: float | None = None  # weight bytes read per token x median tok/s
    device_peak_gb_s: float | None = None  # the device profile's DRAM peak, to judge decode_gb_s against
    predicted_decode_tok_s: float | None = None  # `fit`'s estimate for the device (the real one, when simulated)
    peak_rss_mb: float | None = None  # whole runner process, which never imports torch
    baseline_rss_mb: float | None = None  # same process with the runtime imported, before loading the model
    kv_capacity: int | None = None
    # Filled by the benchmark (benchmarks/run.py), which exports and scores every system itself:
    export_s: float | None = None  # wall time of the whole export command, model load included
    export_peak_rss_mb: float | None = None  # peak RSS of the export command and its children
    mean_kl: float | None = None  # KL(PyTorch fp32 || this system), mean over teacher-forced positions
    top1_agreement: float | None = None  # share of positions whose argmax matches PyTorch fp32's
    machine: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # raw: ttft_ms, decode_step_ms
    error: str | None = None
    timestamp: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


TABLE_COLUMNS = [
    ("system", "system", "{}"), ("runtime", "runtime", "{}"), ("model", "model", "{}"), ("artifact_mb", "size MB", "{:.1f}"),
    ("threads", "thr", "{}"), ("load_s", "load s", "{:.2f}"), ("prompt_tokens", "prompt", "{}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"), ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"), ("decode_tok_s_min", "min", "{:.1f}"),
    ("decode_tok_s_max", "max", "{:.1f}"), ("decode_gb_s", "GB/s", "{:.1f}"),
    ("device_peak_gb_s", "peak GB/s", "{:.1f}"), ("predicted_decode_tok_s", "predicted tok/s", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]


def _cells(r: BenchResult) -> list[str]:
    out = []
    for key, _, fmt in TABLE_COLUMNS:
        v = getattr(r, key)
        out.append("-" if v is None else fmt.format(v))
    if r.emulated:
        out[0] += f" (emulated {r.emulated.split('-cpu ')[-1]})"
    elif r.simulated:
        out[0] += " (simulated)"
    if r.error:
        out[-1] = f"FAILED: {r.error[:160]}"
    return out


def format_table(results: list[BenchResult]) -> str:
    rows = [[h for _, h, _ in TABLE_COLUMNS]] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def format_markdown(results: list[BenchResult]) -> str:
    head = [h for _, h, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results]
    return "\n".join(lines)


def format_json(results: list[BenchResult]) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "results": [r.to_dict() for r in results]}, indent=1)


def format_csv(results: list[BenchResult]) -> str:
    """Every scalar field of the schema, one row per result (raw samples, machine and versions are in JSON)."""
    import csv
    import io

    names = [f.name for f in fields(BenchResult) if f.name not in ("machine", "versions", "samples")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in results:
        w.writerow(["" if getattr(r, n) is None else getattr(r, n) for n in names])
    return buf.getvalue().rstrip("\n")


def format_jsonl(results: list[BenchResult]) -> str:
    """One JSON object per line, each a whole result (for appending to a log)."""
    return "\n".join(json.dumps(r.to_dict()) for r in results)


PRINTERS = {"table": format_table, "markdown": format_markdown, "json": format_json, "csv": format_csv,
            "jsonl": format_jsonl}
