"""Per-weight quantization report: every weight, how it was stored, or why it stayed float."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class WeightEntry:
    name: str  # the target's tensor name
    sources: list[str]  # the PyTorch parameter names it was built from (several when fused)
    shape: list[int]  # [out_features, in_features] as in PyTorch
    scheme: str  # e.g. "int4 MatMulNBits block=32 sym", "int8 per-row", "float32"
    bits: int | None  # None when kept float
    group_size: int | None
    float_bytes: int
    stored_bytes: int
    reason: str
    split: list[int] = field(default_factory=list)  # out-feature sizes of each source when fused
    shares: str | None = None  # a tied table stored once: the target tensor whose codes it reads


@dataclass
class QuantReport:
    entries: list[WeightEntry] = field(default_factory=list)

    def add(self, entry: WeightEntry) -> None:
        self.entries.append(entry)

    def summary(self) -> dict:
        by_scheme: dict[str, dict] = {}
        for e in self.entries:
            s = by_scheme.setdefault(e.scheme, {"weights": 0, "float_mb": 0.0, "stored_mb": 0.0})
            s["weights"] += 1
            s["float_mb"] += e.float_bytes / 1e6
            s["stored_mb"] += e.stored_bytes / 1e6
        total_f = sum(e.float_bytes for e in self.entries) / 1e6
        total_s = sum(e.stored_bytes for e in self.entries) / 1e6
        return {
            "weights": len(self.entries),
            "float_mb": round(total_f, 2),
            "stored_mb": round(total_s, 2),
            "kept_float": [e.name for e in self.entries if e.bits is None],
            "fallbacks": [f"{e.name}: {e.reason}" for e in self.entries if "fell back" in e.reason or "padded" in e.reason],
            "by_scheme": {k: {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in v.items()}
                          for k, v in by_scheme.items()},
        }

    def format_summary(self) -> str:
        s = self.summary()
        lines = [f"quantization: {s['weights']} weights, {s['float_mb']:.1f} MB as fp32 -> {s['stored_mb']:.1f} MB stored"]
        for scheme, v in s["by_scheme"].items():
            lines.append(f"  {scheme:<34} {v['weights']:>4} weights {v['stored_mb']:>8.1f} MB")
        for f in s["fallbacks"]:
            lines.append(f"  fallback: {f}")
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        data = {"summary": self.summary(), "weights": [asdict(e) for e in self.entries]}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, path: Path) -> "QuantReport":
        data = json.loads(Path(path).read_text())
        return cls([WeightEntry(**e) for e in data["weights"]])
