"""What every vLLM benchmark process sets up the same way: the CPU build's environment and the connector."""

from __future__ import annotations

import os
from typing import Any


def prepare_environment(kv_cache_gib: int) -> None:
    """vLLM's CPU build: a KV cache of ``kv_cache_gib`` GiB, the same compute cores with and without a
    connector (a configured connector changes vLLM's core reservation otherwise), no hub access.
    Call before importing vLLM."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"


def connector(engine_id: str, lmplug_config: object | None) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments that add ``LMPlugConnector`` on ``lmplug_config`` (none without one)."""
    if lmplug_config is None:
        return {}
    from vllm.config import KVTransferConfig

    transfer = KVTransferConfig(
        kv_connector="LMPlugConnector",
        kv_role="kv_both",
        engine_id=engine_id,
        kv_connector_extra_config={"lmplug_config": lmplug_config},
    )
    return {"kv_transfer_config": transfer}
