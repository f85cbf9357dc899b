"""The machine slm-export runs on: measures in a fresh child process without torch.

`measure_command` and `read_measure_output` are the one way every device runs the runner
(`python -m slm_export.runtimes.measure`) and reads its answer, here, under limits, or over SSH.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ..errors import SlmExportError
from . import DEVICES
from .probe import describe as probe

# A process killed by SIGKILL: exit -9 from Python's subprocess, 137 from a shell. On a board or a
# phone that is almost always the kernel's (or the app killer's) answer to running out of memory.
KILLED = (-9, 137)


class RunnerKilled(RuntimeError):
    """The runner died of SIGKILL (a failed run, kept as a row like any RuntimeError)."""


def describe() -> dict:
    info = probe()
    info.pop("runtimes", None)
    return {"name": "local", **info}


def measure_command(python: str, folder: str, prompt_file: str, *, decode_tokens: int, warmup: int, repeats: int,
                    threads: int | None, progress: bool = False) -> list[str]:
    cmd = [python, "-m", "slm_export.runtimes.measure", str(folder), "--prompt-ids", prompt_file,
           "--decode-tokens", str(decode_tokens), "--warmup", str(warmup), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    if progress:
        cmd.append("--progress")
    return cmd


def read_measure_output(returncode: int, stdout: str, stderr: str, where: str = "") -> list[dict]:
    """The runner's rows, or the error it stopped with: SlmExportError for bad input, RuntimeError otherwise."""
    lines = [x for x in stderr.strip().splitlines() if not x.startswith("progress:")]
    tail = lines[-1].removeprefix("error: ") if lines else f"exit code {returncode}"
    if returncode == 2:
        raise SlmExportError(tail)
    if returncode in KILLED:
        raise RunnerKilled(f"the runner{where} was killed (SIGKILL, exit {returncode}): out of memory for this "
                           "model, most likely; use fewer bits, a smaller --max-context or a device with more memory")
    if returncode != 0:
        raise RuntimeError(f"runner{where} exited with code {returncode}: {tail}")
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"runner{where} printed no results (stdout: {stdout[-200:]!r})") from None


def write_prompts(prompts: list[list[int]]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    return f.name


@DEVICES.register("local")
class LocalDevice:
    name = "local"
    simulated = False

    def __init__(self, profile=None, **_ssh_options):  # the CLI's SSH flags mean nothing here
        from .profiles import load_profile

        self.profile = profile or load_profile("laptop")

    def describe(self) -> dict:
        return describe()

    def measure(self, folder, *, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
                threads: int | None, timeout_s: float = 1800, cap=None) -> list[dict]:
        """Run the runner in a child process; `cap` (sim.MemoryCap) limits its memory."""
        prompt_file = write_prompts(prompts)
        try:
            cmd = measure_command(sys.executable, folder, prompt_file, decode_tokens=decode_tokens, warmup=warmup,
                                  repeats=repeats, threads=threads)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=cap.preexec() if cap else None)
            if cap:
                cap.watch(proc)
            try:
                out, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise RuntimeError(f"the runner did not finish within {timeout_s:.0f}s") from None
            return read_measure_output(proc.returncode, out, err, where=f" under {self.name}" if cap else "")
        finally:
            os.unlink(prompt_file)
