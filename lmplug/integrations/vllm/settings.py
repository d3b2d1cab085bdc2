"""The lmplug configuration of a vLLM engine: the user's stack plus the model vLLM serves.

The stack comes from ``kv_connector_extra_config["lmplug_config"]`` (a YAML path or a
mapping) or ``$LMPLUG_CONFIG``; without either, the embedded default stack (one cpu tier)
is used. The ``model`` section is filled in from vLLM (name, layers, KV heads, head size,
KV dtype); a ``model`` section the user wrote must agree with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lmplug.core.config import CONFIG_ENV, LmplugConfig, load_config, read_config_file
from lmplug.errors import ConfigError

DEFAULT_STACK: dict[str, Any] = {"tiers": [{"type": "cpu", "capacity": "2GiB"}]}
_TORCH_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def engine_model(vllm_config: Any) -> dict[str, Any]:
    """The ``model`` section lmplug needs, read from a ``VllmConfig``."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    dtype = _CACHE_DTYPES.get(cache_dtype) if cache_dtype != "auto" else _TORCH_DTYPES.get(str(model.dtype))
    if dtype is None:
        raise ConfigError(f"lmplug does not support vLLM's KV cache dtype {cache_dtype!r} / {model.dtype}")
    return {
        "name": str(model.model),
        "num_layers": model.get_num_layers(parallel),
        "num_kv_heads": model.get_num_kv_heads(parallel),
        "head_size": model.get_head_size(),
        "dtype": dtype,
    }


def engine_config(vllm_config: Any, rank: int = 0, environ: Mapping[str, str] | None = None) -> LmplugConfig:
    env = os.environ if environ is None else environ
    transfer = vllm_config.kv_transfer_config
    extra = dict(getattr(transfer, "kv_connector_extra_config", None) or {})
    source = extra.get("lmplug_config") or env.get(CONFIG_ENV)
    if isinstance(source, Mapping):
        data: dict[str, Any] = dict(source)
    elif source:
        data = read_config_file(str(source))
    else:
        data = dict(DEFAULT_STACK)
    model = engine_model(vllm_config)
    given = data.get("model")
    if given is not None:
        for key, value in model.items():
            if key != "name" and key in given and given[key] != value:
                raise ConfigError(f"lmplug config model.{key} is {given[key]!r} but vLLM serves {value!r}")
        model = {**model, **{k: v for k, v in given.items() if k == "name"}}
    data["model"] = model
    # Every token vLLM computed is worth keeping: the partial last chunk of a prompt and the
    # answer are found again by the next turn, which extends them. A config may say otherwise.
    data.setdefault("save_partial_chunks", True)
    parallel = vllm_config.parallel_config
    if int(getattr(parallel, "pipeline_parallel_size", 1)) != 1:
        raise ConfigError("the lmplug vLLM connector supports pipeline_parallel_size 1 so far")
    # Each tensor-parallel rank caches its own shard: rank and world size are part of every key.
    data["world_size"] = int(parallel.tensor_parallel_size)
    data["rank"] = rank
    return load_config(data, environ=env)
