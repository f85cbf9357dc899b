"""A real OpenSSH server on 127.0.0.1 for tests: generated host and user keys, key login only.

`start_sshd(folder)` runs `/usr/sbin/sshd -D -e` on a free port with everything (config, keys,
authorized_keys, pid file, log) in `folder`; it logs in the current user (root too, by key only).
Without sshd the tests skip, or fail when SLM_EXPORT_REQUIRE_SSHD=1 (CI installs openssh-server).
"""
from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

SSHD = "/usr/sbin/sshd"


def require_sshd() -> None:
    if not os.access(SSHD, os.X_OK):
        why = f"{SSHD} is not installed (apt install openssh-server; scripts/setup-test-system.sh, run by scripts/test.sh, does it as root)"
        if os.environ.get("SLM_EXPORT_REQUIRE_SSHD"):
            pytest.fail(f"SLM_EXPORT_REQUIRE_SSHD is set but {why}")
        pytest.skip(why)


def keygen(path: Path) -> Path:
    """A new ed25519 key pair at path (private) and path.pub."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    proc: subprocess.Popen
    port: int
    user: str
    identity: Path  # the user's private key, authorized on the server
    host_key: Path  # the server's private host key (host_key.pub beside it)
    known_hosts: Path  # trusts host_key at [127.0.0.1]:port
    log: Path

    @property
    def address(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def known_hosts_line(self, pub: Path | None = None) -> str:
        kind, b64 = (pub or self.host_key.with_suffix(".pub")).read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}\n"

    def fingerprint(self) -> str:
        """SHA256:... as ssh-keygen prints it."""
        out = subprocess.run(["ssh-keygen", "-lf", str(self.host_key.with_suffix(".pub"))], capture_output=True,
                             text=True, check=True).stdout
        return out.split()[1]

    def kill_sessions(self) -> int:
        """Kill the sshd processes serving connections (children of the listener): the link drops."""
        killed = 0
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.name() == "sshd":
                    p.kill()
                    killed += 1
            except psutil.NoSuchProcess:
                pass
        return killed

    def stop(self) -> None:
        self.kill_sessions()
        self.proc.kill()
        self.proc.wait(10)


def start_sshd(folder: Path) -> Sshd:
    require_sshd()
    folder = Path(folder)
    host_key, identity = keygen(folder / "host_ed25519"), keygen(folder / "user_ed25519")
    (folder / "authorized_keys").write_text(identity.with_suffix(".pub").read_text())
    port, log = free_port(), folder / "sshd.log"
    (folder / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {folder / 'sshd.pid'}
AuthorizedKeysFile {folder / 'authorized_keys'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir, needed as root
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with code {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not listen on port {port} within 15s: {log.read_text()[-2000:]}")
            time.sleep(0.05)
    server = Sshd(proc, port, getpass.getuser(), identity, host_key, folder / "known_hosts", log)
    server.known_hosts.write_text(server.known_hosts_line())
    return server
