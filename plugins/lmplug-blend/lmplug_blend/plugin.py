"""Registers the ``blend`` engine extension (the entry point ``lmplug = blend``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmplug.tierkit import EngineExtensionType, hookimpl
from lmplug_blend.config import BlendConfig
from lmplug_blend.extension import make_blend

__all__ = ["BlendConfig"]


@hookimpl
def lmplug_register_engine_extensions(register: Callable[[EngineExtensionType[Any]], None]) -> None:
    register(
        EngineExtensionType(
            name="blend",
            config_model=BlendConfig,
            factory=make_blend,
            summary="CacheBlend: reuse passages' KV anywhere in a prompt, recompute the tokens that deviate",
        )
    )
