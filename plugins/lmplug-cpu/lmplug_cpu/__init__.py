"""lmplug-cpu: the L1 host-memory tier (``type: cpu``) and the host pool it owns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmplug.tierkit import TierType, hookimpl
from lmplug_cpu.tier import CpuTier, CpuTierConfig

__all__ = ["CpuTier", "CpuTierConfig"]


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(
        TierType(
            name="cpu",
            config_model=CpuTierConfig,
            factory=CpuTier,
            summary="L1 host memory: a pinned-when-CUDA pool with LRU/LFU/FIFO eviction",
        )
    )
