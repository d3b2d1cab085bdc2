#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then serve a multi-round chat workload
# through real vLLM with and without lmplug on the embedded default stack
# (configs/default.yaml). Extra arguments go to examples/vllm_chat.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/bootstrap.sh
exec .venv/bin/python examples/vllm_chat.py "$@"
