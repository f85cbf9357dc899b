"""Phones over their vendors' tools: `adb[:SERIAL]` (Android) and `simctl[:UDID]` (iOS simulator).

adb: the artifact and slm-export's runner are pushed (`adb push`) to /data/local/tmp/slm-export and
run with a Python that lives on the phone (pass its path with --remote-python, e.g. a Python you
built for Android or copied there); the rows come back like every other device's.
simctl: the iOS simulator executes Mac code on the Mac's CPU, so its timings say nothing about an
iPhone: this device reports the simulator it finds and refuses to time, pointing at
`--device sim:iphone-15-pro` (the phone's limits and roofline) and a real iPhone.
Where the tool is not on PATH, each says so in one sentence.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import SlmExportError
from ..units import KIB, RAM_GB
from . import DEVICES
from .local import measure_command, read_measure_output, write_prompts

PHONE_DIR = "/data/local/tmp/slm-export"


def require_tool(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SlmExportError(f"`{tool}` is not on PATH: {what}")
    return path


@DEVICES.register("adb")
class AdbDevice:
    simulated = False

    def __init__(self, serial: str = "", profile=None, remote_python: str | None = None, **_options):
        self.adb = require_tool("adb", "install Android platform-tools "
                                       "(https://developer.android.com/tools/releases/platform-tools) and connect "
                                       "a phone with USB debugging on, or use --device sim:pixel-8 to simulate one")
        attached = [line.split()[0] for line in self._adb("devices").splitlines()[1:] if line.endswith("device")]
        if not attached:
            raise SlmExportError("adb sees no phone: connect one with USB debugging on and accept the prompt on it")
        if serial and serial not in attached:
            raise SlmExportError(f"adb has no phone '{serial}'; attached: {', '.join(attached)}")
        if not serial and len(attached) > 1:
            raise SlmExportError(f"several phones are attached ({', '.join(attached)}); pick one with --device adb:SERIAL")
        self.serial = serial or attached[0]
        self.profile, self.remote_python = profile, remote_python
        self.name = f"adb:{self.serial}"

    def _adb(self, *args: str, timeout: float = 120) -> str:
        serial = ["-s", self.serial] if getattr(self, "serial", "") else []
        proc = subprocess.run([self.adb, *serial, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"adb {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return proc.stdout

    def describe(self) -> dict:
        props = {k: self._adb("shell", "getprop", k).strip() for k in
                 ("ro.product.model", "ro.product.cpu.abi", "ro.build.version.release", "ro.soc.model")}
        mem_kb = next((int(line.split()[1]) for line in self._adb("shell", "cat", "/proc/meminfo").splitlines()
                       if line.startswith("MemTotal")), 0)
        return {"name": self.name, "model": props["ro.product.model"], "arch": props["ro.product.cpu.abi"],
                "soc": props["ro.soc.model"], "os": f"Android {props['ro.build.version.release']}",
                "cores": int(self._adb("shell", "nproc").strip() or 0), "memory_gb": round(mem_kb * KIB / RAM_GB, 1)}

    def measure(self, folder, *, prompts, decode_tokens, warmup, repeats, threads, timeout_s: float = 1800):
        if not self.remote_python:
            raise SlmExportError("the adb device runs slm-export's runner with a Python on the phone; pass its path "
                                 "with --remote-python (the phone needs numpy and the runtime for this artifact)")
        import slm_export

        package = Path(slm_export.__file__).parent
        folder = Path(folder)
        self._adb("shell", "mkdir", "-p", PHONE_DIR)
        self._adb("push", str(package), f"{PHONE_DIR}/pkg/", timeout=600)
        self._adb("push", str(folder), f"{PHONE_DIR}/{folder.name}", timeout=3600)
        prompt_file = write_prompts(prompts)
        try:
            self._adb("push", prompt_file, f"{PHONE_DIR}/prompts.json")
        finally:
            os.unlink(prompt_file)
        cmd = measure_command(self.remote_python, f"{PHONE_DIR}/{folder.name}", f"{PHONE_DIR}/prompts.json",
                              decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, threads=threads)
        shell = f"cd {PHONE_DIR} && PYTHONPATH={PHONE_DIR}/pkg/.. " + " ".join(cmd) + "; echo exit=$?"
        out = subprocess.run([self.adb, "-s", self.serial, "shell", shell], capture_output=True, text=True,
                             timeout=timeout_s)
        lines = out.stdout.strip().splitlines()
        code = int(lines[-1].removeprefix("exit=")) if lines and lines[-1].startswith("exit=") else 1
        return read_measure_output(code, "\n".join(lines[:-1]), out.stderr, where=f" on {self.name}")


@DEVICES.register("simctl")
class SimctlDevice:
    simulated = True

    def __init__(self, udid: str = "", profile=None, **_options):
        self.xcrun = require_tool("xcrun", "the iOS simulator needs macOS with Xcode; on this machine use "
                                           "--device sim:iphone-15-pro to run under an iPhone's limits")
        proc = subprocess.run([self.xcrun, "simctl", "list", "devices", "booted", "-j"], capture_output=True,
                              text=True, timeout=60)
        booted = [d for runtime in json.loads(proc.stdout or "{}").get("devices", {}).values() for d in runtime]
        match = [d for d in booted if not udid or d.get("udid") == udid]
        if not match:
            raise SlmExportError(f"no booted iOS simulator{' ' + udid if udid else ''}; boot one with "
                                 "`xcrun simctl boot <udid>` (list them with `xcrun simctl list devices`)")
        self.sim, self.profile = match[0], profile
        self.name = f"simctl:{self.sim['udid']}"

    def describe(self) -> dict:
        return {"name": self.name, "simulator": self.sim.get("name"), "simulated": True}

    def measure(self, folder, **_kwargs):
        raise SlmExportError(
            f"the iOS simulator ({self.sim.get('name')}) runs Mac code on the Mac's CPU, so its timings are not an "
            "iPhone's and slm-export does not report them; use --device sim:iphone-15-pro for the iPhone's memory "
            "budget and roofline, and a real iPhone (the Swift example in the export folder) for its timings")
