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
                    threads: int | None, progress: bool = False, runtime: str | None = None) -> list[str]:
    cmd = [python, "-m", "slm_export.runtimes.measure", str(folder), "--prompt-ids", prompt_file,
           "--decode-tokens", str(decode_tokens), "--warmup", str(warmup), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    if runtime:
        cmd += ["--runtime", runtime]
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
    emulates = False  # runs another CPU's build of the runtime under emulation (sim: on an ARM profile)
    emulated = ""  # what emulates the device's CPU, e.g. "qemu-aarch64 7.2 -cpu cortex-a76"; empty when native
    stock_runtimes = True  # measure(runtime=...) runs an app's own runtime (bench --runtime stock): this machine's

    def __init__(self, profile=None, **_ssh_options):  # the CLI's SSH flags mean nothing here
        from .profiles import load_profile

        self.profile = profile or load_profile("local")

    def describe(self) -> dict:
        return describe()

    def python(self, runtime: str) -> tuple[list[str], dict | None]:
        """The command that starts a Python able to run `runtime`, and its environment (None: ours)."""
        return [sys.executable], None

    def _run_child(self, args: list[str], runtime: str, timeout_s: float, cap=None) -> tuple[int, str, str]:
        """Run `python -m slm_export.runtimes.X args` in a child process; `cap` (sim.MemoryCap) limits its memory."""
        python, env = self.python(runtime)
        proc = subprocess.Popen([*python, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=cap.preexec() if cap else None)
        if cap:
            cap.watch(proc)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"the runner did not finish within {timeout_s:.0f}s") from None
        return proc.returncode, out, err

    def measure(self, folder, *, prompts: list, decode_tokens: int, warmup: int, repeats: int,
                threads: int | None, timeout_s: float = 1800, cap=None, runtime: str | None = None) -> list[dict]:
        from .. import manifest as mf

        prompt_file = write_prompts(prompts)
        try:
            cmd = measure_command("python", folder, prompt_file, decode_tokens=decode_tokens, warmup=warmup,
                                  repeats=repeats, threads=threads, runtime=runtime)
            code, out, err = self._run_child(cmd[1:], mf.read(folder)["runtime"], timeout_s, cap)
            return read_measure_output(code, out, err, where=f" under {self.name}" if cap else "")
        finally:
            os.unlink(prompt_file)

    def replay(self, folder, steps: list[dict], *, threads: int | None, timeout_s: float = 3600) -> list:
        """Run KV-cache steps on the artifact in a child process (see runtimes.replay); one array per forward."""
        import numpy as np

        from .. import manifest as mf

        with tempfile.TemporaryDirectory(prefix="slm-export-replay-") as tmp:
            steps_file, out_file = os.path.join(tmp, "steps.json"), os.path.join(tmp, "out.npz")
            with open(steps_file, "w") as f:
                json.dump(steps, f)
            args = ["-m", "slm_export.runtimes.replay", str(folder), steps_file, out_file]
            code, out, err = self._run_child(args + (["--threads", str(threads)] if threads else []),
                                             mf.read(folder)["runtime"], timeout_s)
            if code != 0:
                read_measure_output(code, out, err, where=f" on {self.name}")  # raises with the runner's error
            with np.load(out_file) as saved:
                return [saved[f"out_{i}"] for i in range(len(saved.files))]
