"""A runner in a child process, behind the same `Runner` interface.

Used for runtimes that must not share a process with whatever else the caller has loaded. The
torch-free ExecuTorch runner registers the `llama::` kernels in ExecuTorch's one operator registry;
ExecuTorch's own Python packages (imported to export, or for the Python bindings) register the same
names from their libtorch builds, and the registry aborts the whole process on a duplicate. So
`verify`, `generate` and the Python API run that runtime in a child; `bench` measures in its own
torch-free process already (runtimes/measure.py).

    python -m slm_export.runtimes.child FOLDER [--threads N]

reads one JSON request per line on stdin ({"reset": n} or {"forward": [ids], "all_logits": bool})
and answers each with a JSON line ({"shape": [rows, vocab]} followed by the float32 bytes, or
{"error": message, "exit_code": n}).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SlmExportError
from .base import Runner


class ChildRunner(Runner):
    def __init__(self, folder: Path, manifest: dict, threads: int | None, runtime_cls):
        super().__init__(folder, manifest, threads)
        self.packages, self.capacity = runtime_cls.packages, self.max_context
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "slm_export.runtimes.child", str(self.folder), "--threads", str(self.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._ask({"ping": True})

    def _ask(self, request: dict) -> dict:
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            self._proc.wait()
            self._log.seek(0)
            tail = "\n".join(self._log.read().decode(errors="replace").strip().splitlines()[-6:])
            raise SlmExportError(f"the {self.manifest['runtime']} runner process for {self.folder} exited "
                                 f"(code {self._proc.returncode}):\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise SlmExportError(answer["error"])
        return answer

    def reset(self, capacity: int) -> None:
        self._ask({"reset": capacity})
        self.position = 0

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check_room(len(token_ids))
        shape = self._ask({"forward": [int(t) for t in token_ids], "all_logits": all_logits})["shape"]
        data = self._proc.stdout.read(4 * shape[0] * shape[1])
        self.position += len(token_ids)
        return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def serve(folder: str, threads: int | None) -> int:
    from . import open_folder_runner

    out = sys.stdout.buffer
    runner = None
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            if runner is None:
                runner = open_folder_runner(folder, threads)  # the parent checked the files
            if "reset" in request:
                runner.reset(int(request["reset"]))
                answer, data = {"ok": True}, b""
            elif "forward" in request:
                logits = np.ascontiguousarray(runner.forward(request["forward"], bool(request.get("all_logits"))),
                                              dtype=np.float32)
                answer, data = {"shape": list(logits.shape)}, logits.tobytes()
            else:
                answer, data = {"ok": True}, b""
        except SlmExportError as e:
            answer, data = {"error": str(e), "exit_code": e.exit_code}, b""
        out.write((json.dumps(answer) + "\n").encode() + data)
        out.flush()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slm_export.runtimes.child")
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    return serve(a.folder, a.threads)


if __name__ == "__main__":
    sys.exit(main())
