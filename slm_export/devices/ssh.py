"""`ssh://user@host[:port]`: a board over SSH (Raspberry Pi 5 ...) runs the same runner, JSON comes back.

paramiko, not asyncssh or the `ssh` binary: synchronous code that reads top to bottom in a sync CLI,
mature known_hosts handling, SFTP built in, and pure Python (nothing to build on any laptop).

One `measure`: connect (host key checked against known_hosts, key or agent login); probe the board
by piping probe.py to its Python (standard library only, so it works before anything is installed);
check Python >= 3.10 and the runtime, or provision a venv; upload slm_export's .py files and the
artifact, each to a folder named by its content hash, so a second run uploads nothing; run
`python -m slm_export.runtimes.measure` there, streaming its progress; probe again after the run.
"""
from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import posixpath
import secrets
import shlex
import sys
import time
from base64 import b64encode
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

from .. import manifest as mf
from ..errors import SlmExportError
from ..units import MB, kib_to_mb
from . import DEVICES, probe
from .local import KILLED, measure_command, read_measure_output, write_prompts

MIN_PYTHON = (3, 10)
NO_WHEELS_ARCH = ("armv6l", "armv7l", "i386", "i686")  # onnxruntime publishes 64-bit wheels only
q = shlex.quote


class _Lost(Exception):
    """The SSH connection went away: dropped network, rebooted board, killed session."""


class _Overdue(RuntimeError):
    """A remote command outlived its time limit, as timed on this side."""


def parse_address(address: str) -> tuple[str, str, int]:
    try:
        u = urlsplit(address)
        port = 22 if u.port is None else u.port
    except ValueError:  # a port that is not a number, or not below 65536
        port = 0
    if u.scheme != "ssh" or not u.hostname or not port or u.path not in ("", "/"):
        raise SlmExportError(f"bad SSH device address '{address}'; write it as ssh://user@host[:port], "
                             "e.g. ssh://pi@raspberrypi.local")
    return u.username or getpass.getuser(), u.hostname, port


def fingerprint(key) -> str:
    """As OpenSSH prints it, to compare with `ssh-keygen -lf` on the board."""
    return "SHA256:" + b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


@cache
def package_files() -> tuple[str, dict[str, Path]]:
    """The hash of slm_export's .py files, data/ and the C++ runner's sources, and the files (relpath -> path)."""
    root = Path(__file__).resolve().parents[1]
    files = {f"slm_export/{p.relative_to(root).as_posix()}": p for p in sorted(root.rglob("*"))
             if p.is_file() and (p.suffix in (".py", ".cpp", ".h") or p.relative_to(root).parts[0] == "data")}
    h = hashlib.sha256()
    for rel, p in files.items():
        h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16], files


def artifact_digest(folder) -> str:
    # manifest.json holds every file's size and sha256, so its hash names the whole artifact
    return hashlib.sha256((Path(folder) / mf.MANIFEST).read_bytes()).hexdigest()[:16]


class _HostKeyPolicy:
    """paramiko asks this only about a host absent from known_hosts: a changed key never gets here."""

    def __init__(self, device: "SSHDevice"):
        self.dev = device

    def missing_host_key(self, client, hostname, key):
        dev, what = self.dev, f"{key.get_name()} key {fingerprint(key)}"
        if not dev.accept_new_host_key:
            raise SlmExportError(
                f"{hostname} is not in known_hosts ({dev.known_hosts}); it offers the {what}. If that is your "
                f"device (check there: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), pass --accept-new-host-key "
                f"to trust it (it is then saved to {dev.known_hosts})")
        # Appended by hand: paramiko's save_host_keys rewrites the file, dropping lines it cannot parse.
        os.makedirs(os.path.dirname(dev.known_hosts) or ".", mode=0o700, exist_ok=True)
        with open(dev.known_hosts, "a+") as f:
            f.seek(0)
            newline = "\n" if (text := f.read()) and not text.endswith("\n") else ""
            f.write(f"{newline}{hostname} {key.get_name()} {key.get_base64()}\n")
        dev.on_progress(f"trusted the new host {hostname}: {what}, saved to {dev.known_hosts}")


@DEVICES.register("ssh")
class SSHDevice:
    simulated = False

    def __init__(self, address: str, *, profile=None, identity=None, known_hosts=None, accept_new_host_key=False,
                 provision=False, connect_timeout_s=15, command_timeout_s=None, retries=1, on_progress=None,
                 remote_dir="~/.cache/slm-export", python=None, remote_python=None):
        self.user, self.host, self.port = parse_address(address)
        self.name, self.profile = f"ssh://{self.user}@{self.host}:{self.port}", profile
        self.identity = os.path.expanduser(identity) if identity else None
        if self.identity and not os.path.isfile(self.identity):
            raise SlmExportError(f"identity file {identity} does not exist; pass --identity with the private key "
                                 f"that logs in to {self.host}")
        if not isinstance(retries, int) or retries < 0:
            raise SlmExportError(f"retries must be a whole number >= 0, not {retries!r}")
        self.known_hosts = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
        self.accept_new_host_key, self.provision, self.retries = accept_new_host_key, provision, retries
        self.connect_timeout_s, self.command_timeout_s = connect_timeout_s, command_timeout_s
        self.on_progress = on_progress or (lambda line: print(f"{self.host}: {line}", file=sys.stderr, flush=True))
        self.remote_dir, self.python = remote_dir, python or remote_python  # the CLI's --remote-python
        self._client = self._sftp = self._stale_run = self._info = None  # _info: describe(), updated by each probe
        self._reached = False

    # -- connection --------------------------------------------------------------------------------
    def _alive(self) -> bool:
        transport = self._client and self._client.get_transport()
        return bool(transport and transport.is_active())

    def _connect(self) -> None:
        if self._alive():
            return
        import paramiko

        client, t = paramiko.SSHClient(), self.connect_timeout_s
        try:
            if os.path.exists(self.known_hosts):
                client.load_host_keys(self.known_hosts)
        except (OSError, UnicodeDecodeError) as e:
            raise SlmExportError(f"cannot read the known_hosts file {self.known_hosts}: {e}") from None
        client.set_missing_host_key_policy(_HostKeyPolicy(self))
        try:
            client.connect(self.host, self.port, self.user, key_filename=self.identity, allow_agent=True,
                           look_for_keys=not self.identity, timeout=t, banner_timeout=t, auth_timeout=t)
        except BaseException as e:
            client.close()
            if isinstance(e, paramiko.BadHostKeyException):
                raise SlmExportError(
                    f"WARNING: the host key of {self.host}:{self.port} has CHANGED: it offers the {e.key.get_name()} "
                    f"key {fingerprint(e.key)}, known_hosts ({self.known_hosts}) has {fingerprint(e.expected_key)}. "
                    "Someone may be intercepting the connection, or the board was reinstalled; refusing to connect. "
                    f"If you know why it changed, remove the old key (ssh-keygen -R '[{self.host}]:{self.port}' -f "
                    f"{self.known_hosts}) and connect again with --accept-new-host-key") from None
            if isinstance(e, paramiko.AuthenticationException):  # a passphrase-protected key too: use the agent
                raise SlmExportError(
                    f"login to {self.host} as {self.user} failed ({e}); pass --identity with a key authorized there "
                    f"(one with a passphrase: ssh-add it to your agent instead), or add your public key to the board "
                    f"(ssh-copy-id {self.user}@{self.host})") from None
            if isinstance(e, (paramiko.SSHException, OSError, EOFError)):
                reason = f"cannot reach {self.host}:{self.port} over SSH ({e or type(e).__name__})"
                if self._reached:  # it was there a moment ago: a drop, for the retry loop to count
                    raise _Lost(reason) from None
                raise SlmExportError(f"{reason}; check the address, that the board is on the network and that its "
                                     "SSH server runs (sudo systemctl enable --now ssh)") from None
            raise
        client.get_transport().set_keepalive(15)  # notice a board that vanished instead of waiting on TCP
        self._client, self._sftp, self._reached = client, client.open_sftp(), True
        home = self._sftp.normalize(".")  # SFTP does not expand ~
        self.dir = home + self.remote_dir[1:] if self.remote_dir.startswith("~") else self.remote_dir

    def close(self) -> None:
        if self._client:
            self._client.close()
        self._client = self._sftp = None

    def _exec(self, cmd: str, timeout_s: float, *, stdin: str | None = None, on_line=None) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of a remote shell command; on_line gets each stderr line as it comes."""
        chan = self._client.get_transport().open_session(timeout=self.connect_timeout_s)
        chan.exec_command(cmd)
        if stdin is not None:
            chan.sendall(stdin.encode())
            chan.shutdown_write()
        out, err, pending, deadline = bytearray(), bytearray(), b"", time.monotonic() + timeout_s
        while True:
            done, busy = chan.closed or (chan.eof_received and chan.exit_status_ready()), chan.recv_ready()
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                busy, chunk = True, chan.recv_stderr(1 << 16)
                err += chunk
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    on_line and on_line(line.decode(errors="replace"))
            if done:
                break
            if time.monotonic() > deadline:
                chan.close()
                raise _Overdue(f"`{cmd[:80]}` on {self.host} did not finish within {timeout_s:g}s")
            if not busy:
                time.sleep(0.02)
        code = chan.exit_status  # -1 if none came (paramiko's exit_status_ready() is true once closed, too)
        if code == -1:
            transport = self._client.get_transport()
            transport.join(2)  # a dropped link closes the channels first, then ends the transport's thread
            if not transport.is_active():
                raise _Lost("the connection closed before the remote command finished")
            code = KILLED[1]  # paramiko drops exit-signal: killed, almost surely by the OOM killer
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    # -- the board ---------------------------------------------------------------------------------
    def _probe(self) -> dict:
        code, out, err = self._exec(f"{q(self._python)} - {q(self.dir)}", 60, stdin=Path(probe.__file__).read_text())
        if code != 0:
            raise SlmExportError(f"could not run {self._python} on {self.host} ({_tail(err, code)}); install "
                                 "python3 there or pass the device a working `python`")
        info = json.loads(out)
        self._info = self._info or {"name": self.name, "address": f"{self.user}@{self.host}:{self.port}"}
        self._info.update(info, python_path=self._python)
        return info

    def _prepare(self, runtime: str | None) -> dict:
        """Pick the remote Python (the provisioned venv first) and probe it; check it can run the artifact."""
        self._connect()
        venv = f"{self.dir}/venv"
        code, out, err = self._exec(f"mkdir -p {q(self.dir)}/runs && {{ test -x {q(venv)}/bin/python && echo venv; "
                                    "command -v timeout; true; }", 30)
        if code != 0:
            raise SlmExportError(f"cannot create {self.dir} on {self.host} ({_tail(err, code)}); pass a writable "
                                 "remote_dir")
        self._has_timeout = "timeout" in out
        self._python = f"{venv}/bin/python" if "venv" in out.split() else (self.python or "python3")
        info = self._probe()
        if tuple(int(x) for x in info["python"].split(".")[:2]) < MIN_PYTHON:
            raise SlmExportError(f"{self._python} on {self.host} is Python {info['python']}; the runner needs 3.10 "
                                 "or newer: install one there and pass the device its `python`")
        if runtime is None:
            return info
        from ..runtimes import RUNTIMES

        need = [*RUNTIMES.get(runtime).packages, "numpy"]
        missing = [p for p in need if p in probe.RUNTIME_PACKAGES and p not in info["runtimes"]]
        if missing and self.provision:
            if info.get("arch") in NO_WHEELS_ARCH:
                raise SlmExportError(f"{self.host} runs a 32-bit OS ({info['arch']}), for which {need[0]} publishes "
                                     "no pip wheels; install the 64-bit Raspberry Pi OS")
            self._provision(venv, need, RUNTIMES.get(runtime).pip_no_deps)
            info = self._probe()
            missing = [p for p in missing if p not in info["runtimes"]]
        if missing:
            them = "it" if len(missing) == 1 else "them"
            raise SlmExportError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed for "
                                 f"{self._python} on {self.host}; rerun with --provision to install {them} into {venv}")
        return info

    def _provision(self, venv: str, need: list[str], no_deps: bool = False) -> None:
        base = self.python or "python3"
        pins = [f"{p}=={v}" if (v := _local_version(p)) else p for p in need]  # as exported and checked here
        code, _, err = self._exec(f"test -x {q(venv)}/bin/python || {q(base)} -m venv {q(venv)} || "
                                  f"{{ rm -rf {q(venv)}; exit 1; }}", 300)  # no half-made venv left behind
        if code != 0:
            raise SlmExportError(f"could not create {venv} on {self.host} with {base} ({_tail(err, code)}); on "
                                 "Raspberry Pi OS / Debian: sudo apt install python3-venv")
        self.on_progress(f"provisioning {venv} on {self.host}: pip install {' '.join(pins)}")
        code, _, err = self._exec(f"{q(venv)}/bin/python -m pip install --disable-pip-version-check --progress-bar "
                                  f"off {'--no-deps ' if no_deps else ''}{' '.join(map(q, pins))} 1>&2", 1800,
                                  on_line=self.on_progress)  # streamed
        if code != 0:
            raise SlmExportError(f"pip could not install {' '.join(pins)} into {venv} on {self.host}: "
                                 f"{_tail(err, code)}")
        self._python = f"{venv}/bin/python"

    def _upload(self, files: dict[str, Path], final: str, what: str, free_mb: float | None) -> int:
        """Copy files (relpath -> path) into the folder `final` unless it is there, atomically; bytes sent."""
        if self._exec(f"test -d {q(final)}", 30)[0] == 0:
            self.on_progress(f"{what} already on {self.host}, upload skipped")
            return 0
        total = sum(p.stat().st_size for p in files.values())
        no_room = (f"not enough disk on {self.host}: need {total / MB:.1f} MB, {{:.1f}} MB free in {self.dir}; "
                   "free some space or pass a remote_dir on a bigger disk")
        if free_mb is not None and total / MB > free_mb:
            raise SlmExportError(no_room.format(free_mb))
        # Into a temp folder, then one rename: a folder under its final name is always complete. Temp
        # folders of this content left by a dropped connection go first, or they would fill the disk.
        tmp = f"{final}.tmp-{secrets.token_hex(4)}"
        dirs = sorted({posixpath.dirname(f"{tmp}/{rel}") for rel in files})
        self._exec(f"rm -rf {q(final)}.tmp-* && mkdir -p {' '.join(map(q, dirs))}", 60)
        self.on_progress(f"uploading {what} to {self.host} ({total / 1e6:.1f} MB, {len(files)} files)")
        sent, t0 = 0, time.monotonic()
        try:
            for rel, path in files.items():
                try:
                    self._sftp.put(str(path), f"{tmp}/{rel}")
                except OSError:  # SFTP reports a full disk as a bare "Failure": look at the disk
                    df = self._exec(f"df -Pk {q(self.dir)} | tail -n 1", 30)[1].split() if self._alive() else []
                    if len(df) > 3 and df[3].isdigit() and int(df[3]) * 1024 < total - sent:
                        raise SlmExportError(no_room.format(kib_to_mb(int(df[3])) + sent / MB)) from None
                    raise
                sent += path.stat().st_size
            # mv -T fails if a concurrent run put the same content there first: then keep theirs
            code, _, err = self._exec(f"mv -T {q(tmp)} {q(final)} || {{ test -d {q(final)} && rm -rf {q(tmp)}; }}",
                                      60)
            if code != 0:
                raise RuntimeError(f"could not move the upload into {final} on {self.host}: {_tail(err, code)}")
        except BaseException:
            if self._alive():
                self._exec(f"rm -rf {q(tmp)}", 120)
            raise
        self.on_progress(f"uploaded {what} in {time.monotonic() - t0:.1f}s")
        return total

    def _kill_run(self, pid_file: str) -> None:
        # sshd made the run's shell a session leader: kill its whole session (shell, timeout, python)
        self._exec(f"pid=$(cat {q(pid_file)} 2>/dev/null) && {{ pkill -KILL -s $pid || kill -KILL -- -$pid; }}; "
                   f"rm -f {q(pid_file)}", 30)

    # -- the device protocol -----------------------------------------------------------------------
    def describe(self) -> dict:
        """The probe (cpu, arch, memory, python, runtimes, temperature ...); measure() adds the after-run readings."""
        if self._info is None:
            self._prepare(None)
        return self._info

    def measure(self, folder, *, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
                threads: int | None, timeout_s: float = 1800) -> list[dict]:
        folder = Path(folder)
        manifest = mf.read(folder)
        for name in manifest["files"]:
            if name.startswith("/") or ".." in name.split("/"):
                raise SlmExportError(f"{folder / mf.MANIFEST} lists '{name}', outside the artifact; re-export it")
        args = dict(decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, threads=threads)
        import paramiko

        for attempt in range(self.retries + 1):
            try:
                return self._measure_once(folder, manifest, prompts, args, self.command_timeout_s or timeout_s)
            except (_Lost, paramiko.SSHException, EOFError, OSError) as e:
                if not isinstance(e, _Lost) and self._alive():  # an error on a working connection: no retry
                    raise RuntimeError(f"SSH error on {self.host}: {e or type(e).__name__}") from e
                self.close()
                why = f"{e or type(e).__name__}"
                if attempt == self.retries:
                    raise RuntimeError(f"connection to {self.host} lost during the run (after {self.retries} "
                                       f"retries): {why}") from None
                self.on_progress(f"connection to {self.host} lost ({why}); reconnecting, retry {attempt + 1} of "
                                 f"{self.retries}")

    def _measure_once(self, folder: Path, manifest: dict, prompts: list, args: dict, limit: float) -> list[dict]:
        info = self._prepare(manifest["runtime"])
        pkg_digest, pkg_files = package_files()
        pkg, art = f"{self.dir}/pkg/{pkg_digest}", f"{self.dir}/artifacts/{artifact_digest(folder)}"
        free = info.get("free_disk_mb")
        sent = self._upload(pkg_files, pkg, "slm_export's code", free)
        self._upload({**{n: folder / n for n in manifest["files"]}, mf.MANIFEST: folder / mf.MANIFEST}, art,
                     "the artifact", free and free - sent / MB)
        if self._stale_run:  # a run cut off by a dropped connection may still be going: it would skew this one
            self._kill_run(self._stale_run)
        run, local = f"{self.dir}/runs/{secrets.token_hex(6)}", write_prompts(prompts)
        try:
            self._sftp.put(local, run + ".json")
        finally:
            os.unlink(local)
        runner = shlex.join(measure_command(self._python, art, run + ".json", progress=True, **args))
        guard = f"timeout -k 10 {limit:g} " if self._has_timeout else ""  # TERM, then KILL: exit 124, not 137
        # `; exit $?` keeps the runner from being the shell's last command, which it would exec: a signal
        # death would then come as exit-signal, which paramiko drops; the shell reports it as 128+N.
        def stream(line: str) -> None:
            if line.startswith("progress:"):
                self.on_progress(line)

        self._stale_run = run + ".pid"  # if the link drops, the run may go on there: killed before a retry
        try:
            code, out, err = self._exec(f"echo $$ > {q(run)}.pid; PYTHONPATH={q(pkg)} {guard}{runner}; exit $?",
                                        limit + 30, on_line=stream)
        except (_Overdue, KeyboardInterrupt) as e:  # our own deadline, or Ctrl-C: stop the remote run too
            self._kill_run(run + ".pid")
            self._stale_run = None
            if isinstance(e, KeyboardInterrupt):
                raise
            code, out, err = 124, "", ""
        self._stale_run = None
        self._exec(f"rm -f {q(run)}.json {q(run)}.pid", 30)
        if code == 124:
            raise RuntimeError(f"the runner on {self.host} did not finish within the command timeout of {limit:g}s; "
                               "allow more time (command_timeout_s) or measure fewer or shorter prompts")
        if code not in (0, 2) and ("Killed" in err or "Out of memory" in err):
            code = KILLED[1]
        after = self._probe()  # temperature and throttling after the run, beside the readings from before it
        self._info.update(temperature_c=info.get("temperature_c"), throttled=info.get("throttled"),
                          temperature_c_after=after.get("temperature_c"), throttled_after=after.get("throttled"))
        return read_measure_output(code, out, err, where=f" on {self.host}")


def _local_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tail(err: str, code: int) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit code {code}"
