#!/usr/bin/env bash
# Set up, then the main job on the bundled SmolLM2-135M-Instruct: export to ONNX int4, answer a
# question, verify parity against PyTorch, benchmark on this machine, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slm-export demo --out smollm2-onnx-int4 --force "$@"
