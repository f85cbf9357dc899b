"""ARM without a board: the real aarch64 runtimes, run here under QEMU user-mode emulation.

`prepare(profile, runtime)` builds once, in the user's cache folder (~/.cache/slm-export/arm64):

  base/        an aarch64 userland: Debian bookworm's arm64 packages (glibc 2.36 and Python 3.11, as on
               Raspberry Pi OS bookworm), fetched by apt-get into a private apt state (no root, no
               `dpkg --add-architecture` on this machine) and unpacked with `dpkg-deb -x`
  site/NAME/   a runtime's own manylinux aarch64 wheel from PyPI (and numpy's), pinned to the versions
               installed here so the ARM run and the x86 run differ only in their kernels
  roots/CPU-N/ the folder QEMU gets as -L: links into base/ plus a proc/cpuinfo for that CPU model.
               QEMU 7.2 passes the host's /proc/cpuinfo through and onnxruntime's CPU detection crashes
               on an x86 one; with -L, QEMU looks for /proc/cpuinfo under the root first. The features
               the kernels really use come from `-cpu MODEL` (the profile's `qemu_cpu`).
  code/        a link to this slm_export package (pure Python), so the same runner modules run inside
  native/KEY/  for the executorch runtime: slm-export's C++ runner built for aarch64 with Debian's cross
               compiler against the aarch64 executorch wheel in site/ (the emulated root has no compiler)

No binfmt registration is needed: QEMU is called directly on the emulated Python. Every step builds in
a temp folder and renames it into place, so an interrupted prepare leaves nothing half-made and a
re-run does only what is missing.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

from ..errors import SlmExportError

DEBIAN_MIRROR = "http://deb.debian.org/debian"  # override with $SLM_EXPORT_DEBIAN_MIRROR
DEBIAN_SUITE = "bookworm"  # Raspberry Pi OS's base: the same glibc and Python 3.11
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# What `python3.11 -c "import numpy, onnxruntime"` needs, and no more (the Python stdlib's C modules
# link ssl, ffi, lzma, bz2, sqlite, readline; the runtimes' wheels link libstdc++ and libgcc).
DEBIAN_PACKAGES = ("libc6", "libgcc-s1", "libstdc++6", "gcc-12-base", "libgomp1", "zlib1g", "libexpat1", "libffi8",
                   "libssl3", "libbz2-1.0", "liblzma5", "libuuid1", "libcrypt1", "libncursesw6", "libtinfo6",
                   "libsqlite3-0", "libreadline8", "python3.11-minimal", "libpython3.11-minimal",
                   "libpython3.11-stdlib")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64")
# The packages each runtime's emulated site holds (numpy for the runner itself).
RUNTIME_WHEELS = {"onnxruntime": ("onnxruntime", "numpy"), "executorch": ("executorch", "numpy")}
# Why the other runtimes do not run under emulation here (docs/devices.md "ARM without a board").
NOT_EMULATED = {
    "coreml": "Core ML runs only on Apple's operating systems",
}
# The ExecuTorch runtime is slm-export's C++ runner (runtimes/native) on the aarch64 wheel's libraries,
# built here with Debian's cross compiler (the emulated root has none).
CROSS_CXX = "aarch64-linux-gnu-g++"
# What the emulated Python imports to say it runs: sets `version`.
SMOKE = {"onnxruntime": "import onnxruntime; version = onnxruntime.__version__",
         "executorch": ("import ctypes; from importlib.metadata import version as v; "
                        "from slm_export.runtimes.native import library_path; ctypes.CDLL(str(library_path())); "
                        "version = v('executorch')")}

# What Linux prints for each core QEMU can model: (implementer, variant, part, revision). The Features
# line is read from the emulated CPU itself (AT_HWCAP), so it always matches what `-cpu` turns on.
# `max` has no real counterpart; it gets the Cortex-A76's identity (the closest core a profile names).
ARM_CORES = {"cortex-a35": ("0x41", "0x0", "0xd04", 2), "cortex-a53": ("0x41", "0x0", "0xd03", 4),
             "cortex-a57": ("0x41", "0x1", "0xd07", 3), "cortex-a72": ("0x41", "0x0", "0xd08", 3),
             "cortex-a76": ("0x41", "0x4", "0xd0b", 1), "neoverse-n1": ("0x41", "0x3", "0xd0c", 1),
             "a64fx": ("0x46", "0x1", "0x001", 0), "max": ("0x41", "0x4", "0xd0b", 1)}
# Linux arm64 HWCAP / HWCAP2 bit names in bit order (arch/arm64/include/uapi/asm/hwcap.h).
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
               "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2_NAMES = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
                "svebf16 i8mm bf16 dgh rng bti mte").split()
# Run by the emulated Python, before any cpuinfo exists: the feature names of the CPU QEMU emulates.
_READ_HWCAP = f"""
import ctypes
libc = ctypes.CDLL(None); libc.getauxval.restype = ctypes.c_ulong
h1, h2 = libc.getauxval(16), libc.getauxval(26)
print(" ".join([n for i, n in enumerate({HWCAP_NAMES!r}) if h1 >> i & 1] +
               [n for i, n in enumerate({HWCAP2_NAMES!r}) if h2 >> i & 1]))
"""


def cache_root() -> Path:
    from .profiles import cache_dir

    return cache_dir() / "arm64"


def host_is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def find_qemu() -> str:
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not qemu:
        raise SlmExportError("emulating ARM needs QEMU's user-mode emulator and `qemu-aarch64-static` is not on PATH: "
                             "install it with `sudo apt-get install qemu-user-static` (Debian/Ubuntu), or measure with "
                             "this machine's own runtime under the profile's limits: --device limits:PROFILE")
    return qemu


@cache
def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split()
    return out[2] if len(out) > 2 else "?"


def _run(cmd: list[str], what: str, **kw) -> str:
    """Run a download or unpack step; its failure is one sentence naming the step and the tool's last line."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise SlmExportError(f"{what} needs `{cmd[0]}`, which is not installed") from None
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr + proc.stdout).strip().splitlines() if x.strip()]
        last = next((x for x in reversed(lines) if x.startswith(("E:", "ERROR:"))), lines[-1] if lines else "")
        raise SlmExportError(f"{what} failed: {last.strip()[:300]} (check the network, or the mirror/index set "
                             "in $SLM_EXPORT_DEBIAN_MIRROR / pip's config, then re-run)")
    return proc.stdout + proc.stderr


def _into_place(build, final: Path) -> Path:
    """`build(tmp)` in a staged folder that becomes `final` (see staging.py); a no-op when it exists."""
    from ..staging import staged_folder

    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with staged_folder(final, share=False) as tmp:
                build(tmp)
        except OSError as e:
            raise SlmExportError(f"could not write {final}: {e}") from None
    return final


def _base(say) -> Path:
    def build(tmp: Path) -> None:
        if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
            raise SlmExportError("building the aarch64 userland needs `apt-get` and `dpkg-deb` (Debian or Ubuntu); "
                                 "on another distribution run slm-export in a Debian container")
        if not os.path.exists(DEBIAN_KEYRING):
            raise SlmExportError(f"Debian's archive keyring {DEBIAN_KEYRING} is missing: "
                                 "`sudo apt-get install debian-archive-keyring`")
        mirror = os.environ.get("SLM_EXPORT_DEBIAN_MIRROR", DEBIAN_MIRROR)
        apt = tmp / "apt"
        for d in ("state/lists/partial", "cache/archives/partial", "debs"):
            (apt / d).mkdir(parents=True)
        (apt / "state/status").touch()
        (apt / "sources.list").write_text(f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {mirror} {DEBIAN_SUITE} main\n")
        opts = [f"-oDir::State={apt}/state", f"-oDir::State::status={apt}/state/status", f"-oDir::Cache={apt}/cache",
                f"-oDir::Etc::SourceList={apt}/sources.list", "-oDir::Etc::SourceParts=/nonexistent",
                "-oAPT::Architecture=arm64", "-oAPT::Architectures::=arm64", "-oDebug::NoLocking=1",
                "-oAcquire::Retries=2"]
        say(f"downloading Debian {DEBIAN_SUITE}'s arm64 packages from {mirror} (~11 MB)")
        what = f"reading Debian's arm64 package list from {mirror}"
        log = _run(["apt-get", *opts, "update"], what)
        if not list((apt / "state/lists").glob("*Packages*")):  # apt-get update exits 0 when nothing could be fetched
            lines = [x for x in log.splitlines() if x.startswith(("W:", "E:", "Err:"))] or ["no package list arrived"]
            raise SlmExportError(f"{what} failed: {lines[0].strip()[:300]} (check the network, or set "
                                 "$SLM_EXPORT_DEBIAN_MIRROR to a reachable Debian mirror, then re-run)")
        _run(["apt-get", *opts, "download", *DEBIAN_PACKAGES], f"downloading Debian's arm64 packages from {mirror}",
             cwd=apt / "debs")
        root = tmp / "root"
        for deb in sorted((apt / "debs").glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        (tmp / "packages.txt").write_text("\n".join(sorted(p.name for p in (apt / "debs").glob("*.deb"))) + "\n")
        shutil.rmtree(apt)
        python = root / "usr/bin/python3.11"
        if not python.exists():
            raise SlmExportError(f"the downloaded packages hold no {python.name}; is {mirror} a Debian {DEBIAN_SUITE} mirror?")

    return _into_place(build, cache_root() / f"base-{DEBIAN_SUITE}") / "root"


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIME_WHEELS:
        why = NOT_EMULATED.get(runtime, "no aarch64 build of it is set up for emulation")
        raise SlmExportError(f"the {runtime} runtime does not run under ARM emulation here: {why}. Emulated: "
                             f"{', '.join(RUNTIME_WHEELS)}; for this artifact use --device limits:PROFILE (this "
                             "machine's runtime under the profile's limits)")


def _site(runtime: str, say) -> Path:
    check_runtime(runtime)
    pins = []
    for dist in RUNTIME_WHEELS[runtime]:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            raise SlmExportError(f"{dist} is not installed here; the emulated run pins the same version as this "
                                 f"machine's, so install it first (pip install {dist})") from None

    def build(tmp: Path) -> None:
        wheels = tmp / "wheels"
        say(f"downloading the aarch64 wheels of {', '.join(pins)} from PyPI")
        platforms = [x for p in WHEEL_PLATFORMS for x in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *platforms,
              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-q", "-d", str(wheels), *pins],
             f"downloading the aarch64 wheels of {', '.join(pins)}")
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp / "site")
        shutil.rmtree(wheels)

    return _into_place(build, cache_root() / "site" / "-".join(p.replace("==", "-") for p in pins)) / "site"


def _native_lib(site: Path, say) -> Path:
    """slm-export's ExecuTorch runner for aarch64, built against the emulated site's executorch wheel."""
    from ..runtimes import native

    cxx = shutil.which(CROSS_CXX)
    if not cxx:
        raise SlmExportError(f"running a .pte under ARM emulation builds slm-export's ExecuTorch runner for aarch64 with "
                             f"{CROSS_CXX}, which is not installed: apt install g++-aarch64-linux-gnu "
                             "(scripts/setup.sh does, when it can)")
    root = site / "executorch"
    target = cache_root() / "native" / native.source_key("aarch64", str(root), cxx) / "libslm_et.so"
    if not target.is_file():
        say(f"building slm-export's ExecuTorch runner for aarch64 with {CROSS_CXX}")
    return native.build(root, cxx, target, native_flags=False)


def _cpuinfo(qemu: str, cpu: str, base: Path, processors: int) -> str:
    model = cpu.split(",")[0]
    if model not in ARM_CORES:
        raise SlmExportError(f"qemu_cpu '{cpu}': no such ARM core model here; use one of {', '.join(ARM_CORES)} "
                             "(optionally with QEMU properties, e.g. max,sve=off)")
    proc = subprocess.run([qemu, "-cpu", cpu, "-L", str(base), str(base / "usr/bin/python3.11"), "-S", "-c", _READ_HWCAP],
                          capture_output=True, text=True, env=_clean_env())
    if proc.returncode != 0:
        raise SlmExportError(f"qemu-aarch64 could not run the emulated Python with -cpu {cpu}: "
                             f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    features = proc.stdout.split()
    features.insert(2, "evtstrm")  # the kernel's timer event stream: every Linux on ARM prints it
    implementer, variant, part, revision = ARM_CORES[model]
    block = (f"BogoMIPS\t: 108.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: {implementer}\n"
             f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n")
    return "".join(f"processor\t: {i}\n{block}" for i in range(processors))


def _clean_env(**extra) -> dict:
    # Only what the emulated Python should see: no host PYTHONPATH/PYTHONHOME, no QEMU_* settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_", "VIRTUAL_ENV"))}
    return {**env, "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


@dataclass(frozen=True)
class ArmEnvironment:
    """An emulated aarch64 Python with one runtime: `command(...)` runs it, `env()` is its environment."""
    qemu: str
    cpu: str  # QEMU's -cpu value (the profile's qemu_cpu)
    root: Path
    site: Path
    code: Path
    native_lib: Path | None = None  # the aarch64 ExecuTorch runner, for the executorch runtime

    def command(self, *args: str) -> list[str]:
        return [self.qemu, "-cpu", self.cpu, "-L", str(self.root), str(self.root / "usr/bin/python3.11"), *args]

    def env(self) -> dict:
        extra = {"SLM_EXPORT_NATIVE_LIB": str(self.native_lib)} if self.native_lib else {}
        return _clean_env(PYTHONPATH=os.pathsep.join([str(self.site), str(self.code)]), **extra)

    def describe(self) -> str:
        return f"qemu-aarch64 {qemu_version(self.qemu)} -cpu {self.cpu}"


def prepare(profile, runtime: str = "onnxruntime", say=None) -> ArmEnvironment:
    """The emulated environment for `profile`'s CPU and `runtime`, built on first use (see the module doc)."""
    say = say or (lambda text: print(f"prepare: {text}", file=sys.stderr, flush=True))
    if not profile.qemu_cpu:
        raise SlmExportError(f"profile '{profile.name}' has no qemu_cpu: it does not describe an ARM device to emulate")
    check_runtime(runtime)  # before any download
    qemu = find_qemu()
    base = _base(say)
    site = _site(runtime, say)
    native_lib = _native_lib(site, say) if runtime == "executorch" else None
    processors = len(os.sched_getaffinity(0))  # /sys/devices/system/cpu is the host's, so list as many

    def build_root(tmp: Path) -> None:
        for entry in base.iterdir():
            (tmp / entry.name).symlink_to(entry)
        (tmp / "proc").mkdir()
        (tmp / "proc/cpuinfo").write_text(_cpuinfo(qemu, profile.qemu_cpu, base, processors))

    root = _into_place(build_root, cache_root() / "roots" / f"{profile.qemu_cpu.replace(',', '_')}-{processors}")
    # A link to this package, renewed each time: the emulated runner is this very code.
    code = cache_root() / "code"
    code.mkdir(parents=True, exist_ok=True)
    link = code / "slm_export"
    here = Path(__file__).resolve().parents[1]
    if not (link.is_symlink() and link.resolve() == here):
        tmp_link = code / f".slm_export-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(here)
        os.replace(tmp_link, link)
    return ArmEnvironment(qemu, profile.qemu_cpu, root, site, code, native_lib)


def smoke_test(arm: ArmEnvironment, runtime: str) -> str:
    """Import the runtime in the emulated Python: one line saying what runs, or SlmExportError."""
    code = (f"{SMOKE[runtime]}; import platform; feats = [l for l in open('/proc/cpuinfo') if l.startswith('Features')]; "
            f"print(f'{runtime} {{version}} on {{platform.machine()}} Python {{platform.python_version()}}, '"
            f"f'{{feats[0].split(\":\")[1].strip()}}')")
    proc = subprocess.run(arm.command("-c", code), capture_output=True, text=True, env=arm.env(), timeout=300)
    if proc.returncode != 0:
        raise SlmExportError(f"the emulated {runtime} does not start ({arm.describe()}): "
                             f"{(proc.stderr.strip().splitlines() or [f'exit code {proc.returncode}'])[-1]}")
    return f"{proc.stdout.strip()} ({arm.describe()})"
