"""lmplug-example: tier type ``example``, KV chunks in a dictionary. The hookimpls, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmplug.tierkit import TierType, hookimpl
from lmplug_example.tier import ExampleTier, ExampleTierConfig

__all__ = ["ExampleTier", "ExampleTierConfig"]


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(TierType("example", ExampleTierConfig, ExampleTier, "KV chunks in a dictionary, oldest dropped first"))
