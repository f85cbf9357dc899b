#!/usr/bin/env bash
# Set up, then run every test: fast unit tests on tiny models (~2 min) and the real
# SmolLM2-135M-Instruct tests marked slow (~4 min). Add -m "not slow" for the fast ones only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
