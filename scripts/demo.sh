#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the multi-round chat workload
# on the embedded default stack (configs/default.yaml). Extra arguments go to the demo.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/bootstrap.sh
exec .venv/bin/python examples/kv_demo.py "$@"
