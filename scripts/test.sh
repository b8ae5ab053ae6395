#!/usr/bin/env bash
# The test command: lint and format check, then the whole test suite (slow tests included).
#
#   bash scripts/test.sh            # after bash scripts/setup.sh
#   bash scripts/test.sh -x -k cut  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
