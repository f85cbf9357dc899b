"""An exported artifact folder, and what a user does with it: run, generate, bench, verify."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import manifest as mf


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, check: bool = True) -> "Artifact":
        """Open an artifact or bundle folder, or a bundle .zip (extracted safely into the cache)."""
        from .bundle import open_path

        path = open_path(path)
        manifest = mf.read(path)
        if check:
            mf.check_files(path, manifest)
        return cls(path, manifest)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def size_mb(self) -> float:
        return mf.model_size_bytes(self.manifest) / 1e6

    def runner(self, threads: int | None = None, in_process: bool = False):
        from .runtimes import open_runner

        return open_runner(self.path, self.manifest, threads, in_process)

    def codec(self):
        from .text import TextCodec

        return TextCodec(self.path, self.manifest)

    def generate(self, prompt: str, max_new_tokens: int = 64, chat: bool = True, on_text=None, **sampling) -> str:
        """Generate a reply; `on_text(piece)` streams the text as tokens arrive."""
        from .runtimes.base import generate

        codec = self.codec()
        ids = codec.encode_chat(prompt) if chat else codec.encode(prompt)
        out: list[int] = []
        shown = [""]

        def stream(token: int) -> None:
            out.append(token)
            text = codec.decode(out)  # decode the whole reply: multi-byte characters span tokens
            if on_text and text.startswith(shown[0]) and not text.endswith("\ufffd"):
                on_text(text[len(shown[0]):])
                shown[0] = text

        result = generate(self.runner(), ids, max_new_tokens, codec.eos_ids, on_token=stream, **sampling)
        text = codec.decode(result)
        if on_text and text != shown[0] and text.startswith(shown[0]):
            on_text(text[len(shown[0]):])
        return text

    def bench(self, **kwargs):
        """Measure on a device; the rows are also kept as reports/bench.json for `inspect` and `bundle`."""
        from .bench import bench
        from .bundle import BENCH_FILE, save_report
        from .results import SCHEMA_VERSION

        rows = bench(self, **kwargs)
        save_report(self.path, BENCH_FILE, {"schema_version": SCHEMA_VERSION, "results": [r.to_dict() for r in rows]})
        return rows

    def verify(self, reference=None, **kwargs):
        """Parity against PyTorch; the report is also kept as reports/parity.json."""
        from .bundle import PARITY_FILE, save_report
        from .devices.local import describe
        from .verify import verify

        report = verify(self, reference=reference, **kwargs)
        save_report(self.path, PARITY_FILE, dict(report.to_dict(), machine=describe()))
        return report

    def bundle(self, out=None, make_zip: bool = False, force: bool = False):
        from .bundle import bundle

        return bundle(self, out=out, make_zip=make_zip, force=force)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.target!r}, quant={self.manifest['quant']['label']!r}, size_mb={self.size_mb:.1f})"
