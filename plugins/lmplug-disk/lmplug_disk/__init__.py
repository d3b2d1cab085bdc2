"""lmplug-disk: the L3 local-disk tier (``type: disk``): one file per chunk, O_DIRECT where
the filesystem supports it, write-behind, and an index that survives restarts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmplug.tierkit import TierType, hookimpl
from lmplug_disk.tier import DiskTier, DiskTierConfig

__all__ = ["DiskTier", "DiskTierConfig"]


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(
        TierType(
            name="disk",
            config_model=DiskTierConfig,
            factory=DiskTier,
            summary="L3 local disk: chunk files with checksums, O_DIRECT, write-behind, persistent index",
        )
    )
