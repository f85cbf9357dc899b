"""The SSH device against a real OpenSSH server on 127.0.0.1: upload, remote run, host keys, faults.

The "board" is this machine: the remote Python is this venv's (it has onnxruntime and numpy), and
faults are made with a fake `python` (a shell script that runs the real one) or by killing sshd's
session processes in the middle of a run.
"""
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from slm_export.devices import open_device
from slm_export.devices.ssh import SSHDevice, artifact_digest, package_files
from slm_export.errors import SlmExportError

from sshd import free_port, keygen, start_sshd
from test_runner_and_cli import tiny_art  # noqa: F401  (module scoped: one tiny int4 ONNX export)

RUN = dict(prompts=[list(range(10, 18))], decode_tokens=8, warmup=1, repeats=1, threads=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


@pytest.fixture
def device(server, tmp_path):
    """A device factory: this test's remote_dir, the server's key and known_hosts, messages recorded."""
    said = []

    def make(**kw):
        options = dict(identity=server.identity, known_hosts=server.known_hosts, remote_dir=str(tmp_path / "remote"),
                       python=sys.executable, connect_timeout_s=10, on_progress=said.append)
        return SSHDevice(server.address, **{**options, **kw})

    make.said = said
    return make


def fake_python(folder: Path, when_measuring: str) -> str:
    """A `python` that runs `when_measuring` (shell) first when started as the runner; the probe runs normally."""
    script = folder / "python"
    script.write_text(f'#!/bin/sh\ncase "$*" in *slm_export.runtimes.measure*) {when_measuring} ;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_measure_uploads_and_runs_the_runner_remotely(device, tiny_art, tmp_path):  # noqa: F811
    dev = device()
    rows = dev.measure(tiny_art.path, **RUN)
    assert len(rows) == 1 and rows[0]["decode_tok_s"] > 0 and rows[0]["prompt_tokens"] == 8
    assert len(rows[0]["samples"]["decode_step_ms"]) == 8
    remote = tmp_path / "remote" / "artifacts" / artifact_digest(tiny_art.path)
    for name, meta in tiny_art.manifest["files"].items():
        assert (remote / name).stat().st_size == meta["bytes"]
    assert (remote / "manifest.json").read_bytes() == (tiny_art.path / "manifest.json").read_bytes()
    assert (tmp_path / "remote" / "pkg" / package_files()[0] / "slm_export" / "runtimes" / "measure.py").is_file()
    assert not list((tmp_path / "remote").rglob("*.tmp-*")) and not list((tmp_path / "remote" / "runs").iterdir())
    assert any(m.startswith("uploading the artifact") for m in device.said)
    assert any(m.startswith("progress: prompt 8:") for m in device.said)  # the runner's lines, streamed
    info = dev.describe()
    assert info["name"] == dev.name and info["python"] and info["runtimes"]["onnxruntime"]
    assert "temperature_c_after" in info and "throttled_after" in info
    dev.close()


def test_second_run_skips_the_upload(device, tiny_art, tmp_path):  # noqa: F811
    device().measure(tiny_art.path, **RUN)
    remote = tmp_path / "remote" / "artifacts" / artifact_digest(tiny_art.path)
    before = remote.stat(), (remote / "manifest.json").stat()
    device.said.clear()
    rows = device().measure(tiny_art.path, **RUN)  # a new connection, as a second `slm-export bench` would make
    assert rows[0]["decode_tok_s"] > 0
    assert "the artifact already on 127.0.0.1, upload skipped" in device.said
    assert "slm_export's code already on 127.0.0.1, upload skipped" in device.said
    assert not any(m.startswith("uploading") for m in device.said)
    after = remote.stat(), (remote / "manifest.json").stat()
    assert [(s.st_ino, s.st_mtime_ns) for s in before] == [(s.st_ino, s.st_mtime_ns) for s in after]


def test_changed_host_key_is_refused_even_with_the_flag(device, server, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line(other.with_suffix(".pub")))
    for accept in (False, True):
        with pytest.raises(SlmExportError, match=r"host key of 127\.0\.0\.1:\d+ has CHANGED") as e:
            device(known_hosts=known, accept_new_host_key=accept).describe()
        assert server.fingerprint() in str(e.value) and "refusing to connect" in str(e.value)
    assert known.read_text() == server.known_hosts_line(other.with_suffix(".pub"))  # never overwritten


def test_unknown_host_needs_the_flag_and_is_then_saved(device, server, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"  # not there yet
    with pytest.raises(SlmExportError, match=r"not in known_hosts .*pass --accept-new-host-key to trust it") as e:
        device(known_hosts=known).describe()
    assert server.fingerprint() in str(e.value) and f"saved to {known}" in str(e.value)
    assert not known.exists()
    info = device(known_hosts=known, accept_new_host_key=True).describe()
    assert info["runtimes"]["onnxruntime"]
    assert known.read_text() == server.known_hosts_line()
    assert any("trusted the new host" in m and server.fingerprint() in m for m in device.said)
    assert device(known_hosts=known).describe()["python"]  # known now: no flag needed


def test_connection_cut_mid_run_is_retried(device, tiny_art, server, tmp_path):  # noqa: F811
    # The fake python announces itself and, the first time, sleeps before the real runner: the cut
    # lands mid-run, and the cut-off run would still be asleep when the retry is done, unless killed.
    python = fake_python(tmp_path, f"echo 'progress: starting' >&2; test -e {tmp_path}/again || "
                                   f"{{ touch {tmp_path}/again; sleep 8; }}")
    cuts = []

    def cut(line):
        device.said.append(line)
        if line.startswith("progress:") and not cuts:
            cuts.append(server.kill_sessions())

    rows = device(python=python, retries=1, on_progress=cut).measure(tiny_art.path, **RUN)
    assert cuts[0] >= 1 and rows[0]["decode_tok_s"] > 0
    assert any("lost" in m and "retry 1 of 1" in m for m in device.said)
    retry = [m for m in device.said if "retry 1 of 1" in m][0]
    assert "the artifact already on 127.0.0.1, upload skipped" in device.said[device.said.index(retry):]
    # the cut-off run was killed before the retry ran, not left to compete with it
    remote = str(tmp_path / "remote")
    assert not [p for p in psutil.process_iter(["cmdline"]) if remote in " ".join(p.info["cmdline"] or [])], device.said


def test_connection_cut_without_retries_is_a_clear_error(device, tiny_art, server, tmp_path):  # noqa: F811
    python = fake_python(tmp_path, "echo 'progress: starting' >&2; sleep 2")

    def cut(line):
        if line.startswith("progress:"):
            server.kill_sessions()

    with pytest.raises(RuntimeError, match=r"connection to 127\.0\.0\.1 lost during the run \(after 0 retries\)"):
        device(python=python, retries=0, on_progress=cut).measure(tiny_art.path, **RUN)


def test_missing_runtime_says_to_provision(device, tiny_art, tmp_path):  # noqa: F811
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    with pytest.raises(SlmExportError, match=r"onnxruntime and numpy are not installed for .*bare/bin/python on "
                                             r"127\.0\.0\.1; rerun with --provision to install them into .*/venv"):
        device(python=str(bare / "bin" / "python")).measure(tiny_art.path, **RUN)


def test_remote_oom_kill_is_reported(device, tiny_art, tmp_path):  # noqa: F811
    python = fake_python(tmp_path, "kill -9 $$")  # what the kernel's OOM killer does
    with pytest.raises(RuntimeError, match=r"runner on 127\.0\.0\.1 was killed \(SIGKILL, exit 137\): out of memory"):
        device(python=python).measure(tiny_art.path, **RUN)


def test_remote_timeout_is_reported(device, tiny_art, tmp_path):  # noqa: F811
    python = fake_python(tmp_path, "sleep 30")
    with pytest.raises(RuntimeError, match=r"did not finish within the command timeout of 1s"):
        device(python=python, command_timeout_s=1).measure(tiny_art.path, **RUN)
    remote = str(tmp_path / "remote")
    assert not [p for p in psutil.process_iter(["cmdline"]) if remote in " ".join(p.info["cmdline"] or [])], device.said


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs as the remote_dir's disk (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()[:200]}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_not_enough_disk_is_checked_before_uploading(device, tiny_art, small_disk):  # noqa: F811
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 256 * 1024))  # leaves less than the code and artifact need
    with pytest.raises(SlmExportError, match=r"not enough disk on 127\.0\.0\.1: need [\d.]+ MB, [\d.]+ MB free in "):
        device(remote_dir=str(small_disk / "cache")).measure(tiny_art.path, **RUN)
    assert not any(m.startswith("uploading") for m in device.said)  # refused before sending a byte


def test_disk_filling_up_during_the_upload(device, tiny_art, small_disk):  # noqa: F811
    def fill(line):  # someone else takes the disk just as the artifact's upload starts
        if line.startswith("uploading the artifact"):
            subprocess.run(["fallocate", "-l", str(os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize),
                            str(small_disk / "filler")], check=True)

    with pytest.raises(SlmExportError, match=r"not enough disk on 127\.0\.0\.1: need [\d.]+ MB"):
        device(remote_dir=str(small_disk / "cache"), on_progress=fill).measure(tiny_art.path, **RUN)
    assert not list((small_disk / "cache" / "artifacts").iterdir())  # the partial upload was removed


@pytest.mark.parametrize("address", ["ssh://", "ssh://pi@:22", "ssh://pi@host:99999", "ssh://pi@host:abc",
                                     "ssh://pi@host:0", "ssh://pi@host/some/path"])
def test_bad_address(address):
    with pytest.raises(SlmExportError, match="bad SSH device address"):
        SSHDevice(address)


def test_address_defaults_and_registry():
    dev = open_device("ssh://pi@raspberrypi.local")
    assert isinstance(dev, SSHDevice) and dev.name == "ssh://pi@raspberrypi.local:22" and not dev.simulated
    assert SSHDevice("ssh://10.0.0.5:2222").user  # the local user by default


def test_unreachable_host_and_refused_login(server, tmp_path):
    closed = SSHDevice(f"ssh://127.0.0.1:{free_port()}", connect_timeout_s=5)
    with pytest.raises(SlmExportError, match=r"cannot reach 127\.0\.0\.1:\d+ over SSH"):
        closed.describe()
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(SlmExportError, match=r"login to 127\.0\.0\.1 as \S+ failed .*ssh-copy-id"):
        SSHDevice(server.address, identity=stranger, known_hosts=server.known_hosts).describe()


@pytest.mark.slow  # pip installs numpy and onnxruntime from PyPI into a fresh venv: ~15 s with a warm pip cache
def test_provision_installs_the_runtime_pinned_to_this_machines_versions(device, tiny_art, tmp_path):  # noqa: F811
    import importlib.metadata

    bare = tmp_path / "bare"  # a Python without numpy or onnxruntime, as on a fresh Raspberry Pi OS
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    rows = device(python=str(bare / "bin" / "python"), provision=True).measure(tiny_art.path, **RUN)
    assert rows[0]["decode_tok_s"] > 0
    assert any(m.startswith("provisioning") and "onnxruntime==" in m for m in device.said)
    assert any("Successfully installed" in m for m in device.said)  # pip's own output, streamed
    venv_python = tmp_path / "remote" / "venv" / "bin" / "python"
    versions = subprocess.run([venv_python, "-c", "import importlib.metadata as m; print(m.version('numpy'), "
                               "m.version('onnxruntime'))"], capture_output=True, text=True, check=True).stdout.split()
    assert versions == [importlib.metadata.version("numpy"), importlib.metadata.version("onnxruntime")]
    device.said.clear()  # next time the venv is there and used: nothing to install
    dev = device(python=str(bare / "bin" / "python"), provision=True)
    assert dev.measure(tiny_art.path, **RUN)[0]["decode_tok_s"] > 0
    assert not any(m.startswith("provisioning") for m in device.said)
    assert dev.describe()["python_path"] == str(venv_python)


def test_measure_runs_a_pte_remotely_with_the_torch_free_runner(device, tmp_path):
    """The .pte runner's C++ sources go up with the package; the board builds it once (g++) and runs it."""
    import slm_export
    from conftest import require_extra, tiny_model

    require_extra("executorch", "executorch")  # says why; fails instead under SLM_EXPORT_REQUIRE_SDKS (CI)

    art = slm_export.export(tiny_model("llama"), target="executorch", bits=4, out=tmp_path / "pte", max_context=64,
                            log=lambda *a: None)
    rows = device().measure(art.path, **RUN)
    assert rows[0]["decode_tok_s"] > 0 and rows[0]["peak_rss_mb"] > rows[0]["baseline_rss_mb"]
    pkg = tmp_path / "remote" / "pkg" / package_files()[0] / "slm_export" / "runtimes" / "native"
    assert {p.name for p in pkg.iterdir()} >= {"runner.cpp", "llama_ops.cpp", "attention.h"}


@pytest.mark.slow  # pip installs executorch (without its dependencies) and numpy from PyPI into a fresh venv
def test_provision_for_a_pte_installs_executorch_without_torch(device, tmp_path):
    import slm_export
    from conftest import require_extra, tiny_model

    require_extra("executorch", "executorch")
    art = slm_export.export(tiny_model("llama"), target="executorch", bits=4, out=tmp_path / "pte", max_context=64,
                            log=lambda *a: None)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    rows = device(python=str(bare / "bin" / "python"), provision=True).measure(art.path, **RUN)
    assert rows[0]["decode_tok_s"] > 0
    assert any(m.startswith("provisioning") and "executorch==" in m for m in device.said)
    venv_python = tmp_path / "remote" / "venv" / "bin" / "python"
    has = subprocess.run([venv_python, "-c", "import importlib.util as u; print(u.find_spec('torch') is not None, "
                          "u.find_spec('executorch') is not None)"], capture_output=True, text=True, check=True)
    assert has.stdout.split() == ["False", "True"]  # the runner needs the wheel's C++ runtime, not torch


def test_cli_bench_on_a_named_ssh_device(server, tiny_art, tmp_path):  # noqa: F811
    """The user's path: a profile file with an address, `slm-export bench DIR --device NAME`, rows back."""
    from conftest import run_cli

    config = tmp_path / "config" / "devices"
    config.mkdir(parents=True)
    (config / "test-pi.toml").write_text(
        f'extends = "raspberry-pi-5-8gb"\naddress = "{server.address}"\nidentity = "{server.identity}"\n'
        f'known_hosts = "{server.known_hosts}"\nremote_python = "{sys.executable}"\nremote_dir = "{tmp_path / "r"}"\n')
    code, out, err = run_cli("bench", tiny_art.path, "--device", "test-pi", "--prompt-tokens", "8", "--decode-tokens",
                             "4", "--repeats", "1", "--json", tmp_path / "b.json",
                             env={"SLM_EXPORT_CONFIG": str(tmp_path / "config")})
    assert code == 0, err
    assert "progress: loaded" in err and "uploading the artifact" in err
    import json

    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["device"] == server.address  # ssh://user@127.0.0.1:PORT
    assert row["decode_tok_s"] > 0 and not row["simulated"] and row["device_peak_gb_s"] == 17.1
    assert row["machine"]["python_path"] == sys.executable and "onnxruntime" in row["versions"]
