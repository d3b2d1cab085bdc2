#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv, then lint, type-check and test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cache).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/bootstrap.sh
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy" >&2
.venv/bin/mypy
echo "== import-linter" >&2
.venv/bin/lint-imports
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
