"""Parent-side plumbing shared by the peers: their virtual environments, measured commands, children.

Standard library only, so the benchmark runner imports it whatever is installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE.parent / ".venvs"  # one per peer; made by the script, reused when present
# Run a command and print its wall time and peak RSS (ru_maxrss over its waited descendants) as
# JSON into the file argv[1]. A fresh wrapper per command: RUSAGE_CHILDREN is a maximum over *all*
# children, so in a long-lived parent it would keep the largest export seen so far.
_MEASURED = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t,\n"
    "  'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6}))  # KiB -> MB\n")


class PeerError(RuntimeError):
    """A peer could not be installed, export or run here: recorded in the results table with this text."""


def last_line(text: str, errors_only: bool = False) -> str:
    """The one line worth showing: the last (error) line of a tool's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] if errors_only else []
    return (errors or lines or ["(no output)"])[-1]


def ensure_venv(name: str, installs: list[list[str]], check: str, env: dict | None = None) -> Path:
    """VENVS/name made with `installs` (each a pip argument list) unless `check` already imports there."""
    venv = VENVS / name
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0:
        return py
    VENVS.mkdir(parents=True, exist_ok=True)
    cmds = [[sys.executable, "-m", "venv", str(venv)], [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"]]
    cmds += [[str(py), "-m", "pip", "install", "-q", *args] for args in installs]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if r.returncode != 0:
            raise PeerError(f"{name} venv: `{' '.join(cmd[3:])}` failed: {last_line(r.stdout + r.stderr, True)}")
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerError(f"{name} venv installed but `{check}` fails: {last_line(r.stderr)}")
    return py


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd; {'wall_s', 'peak_rss_mb', 'output'}; PeerError with its last error line if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "measured.json"
        proc = subprocess.run([sys.executable, "-c", _MEASURED, str(report), *map(str, cmd)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
        output = proc.stdout
        got = report.read_text() if report.exists() else ""
    if proc.returncode != 0 or not got or json.loads(got)["rc"] != 0:
        raise PeerError(f"`{Path(str(cmd[0])).name} {' '.join(map(str, cmd[1:3]))} ...` failed: "
                        f"{last_line(output, errors_only=True)}")
    return {**json.loads(got), "output": output}


def run_child(py: Path, child: Path, cfg: dict, what: str) -> dict:
    """py child CONFIG -> the JSON it prints (protocol.child_main); PeerError naming `what` if it fails.
    The caller's PYTHONPATH is kept, so a child of our venv reads the checkout being measured."""
    r = subprocess.run([str(py), str(child), json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))})
    if r.returncode != 0:
        raise PeerError(f"{what} failed (exit {r.returncode}): {last_line(r.stderr)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_per_prompt(py: Path, child: Path, artifact, prompts: list[list[int]], decode_tokens: int, warmup: int,
                     repeats: int, threads: int, name: str) -> list[dict]:
    """A peer's bench: one child process per prompt (so each row's peak RSS is its own), versions on each row."""
    rows = []
    for ids in prompts:
        cfg = dict(artifact=str(artifact), mode="bench", threads=threads, prompts=[list(map(int, ids))],
                   decode_tokens=decode_tokens, warmup=warmup, repeats=repeats)
        got = run_child(py, child, cfg, f"{name} bench of {Path(artifact).name} ({len(ids)}-token prompt)")
        rows += [{**r, "versions": got["versions"]} for r in got["rows"]]
    return rows


def dir_mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
