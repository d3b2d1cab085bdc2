"""Registers the ``pd`` tier (the entry point ``lmplug = pd``); the proxy never imports this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmplug.tierkit import TierType, hookimpl
from lmplug_pd.options import PDTierConfig
from lmplug_pd.tier import PDTier

__all__ = ["PDTier", "PDTierConfig"]


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(
        TierType(
            name="pd",
            config_model=PDTierConfig,
            factory=PDTier,
            summary="PD transfer: pushes a prompt's KV to a decode instance, receives prefill instances' pushes",
        )
    )
