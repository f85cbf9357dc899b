#!/usr/bin/env bash
# Set up (Python packages, then the system packages the tests use, said on screen), then run every test: unit tests on tiny models (ONNX ~2 min, ExecuTorch ~10 min, Core ML
# ~6 min) and the real SmolLM2-135M-Instruct tests marked slow (ONNX ~4 min, ExecuTorch ~7 min: its
# export alone takes ~4, Core ML ~5). Add -m "not slow" for the tiny-model tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-test-system.sh
exec .venv/bin/python -m pytest -q "$@"
