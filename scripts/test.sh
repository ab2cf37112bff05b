#!/usr/bin/env bash
# Set up (pinned) and run the CPU test suite: everything but GPU-only and slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -m "not gpu and not slow and not vllm" "$@"
