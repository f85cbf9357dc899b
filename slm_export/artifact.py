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
        path = Path(path).expanduser()
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

    def runner(self, threads: int | None = None):
        from .runtimes import open_runner

        return open_runner(self.path, self.manifest, threads)

    def codec(self):
        from .text import TextCodec

        return TextCodec(self.path, self.manifest)

    def generate(self, prompt: str, max_new_tokens: int = 64, chat: bool = True, **sampling) -> str:
        from .runtimes.base import generate

        codec = self.codec()
        ids = codec.encode_chat(prompt) if chat else codec.encode(prompt)
        out = generate(self.runner(), ids, max_new_tokens, codec.eos_ids, **sampling)
        return codec.decode(out)

    def bench(self, **kwargs):
        from .bench import bench

        return bench(self, **kwargs)

    def verify(self, reference=None, **kwargs):
        from .verify import verify

        return verify(self, reference=reference, **kwargs)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.target!r}, quant={self.manifest['quant']['label']!r}, size_mb={self.size_mb:.1f})"
