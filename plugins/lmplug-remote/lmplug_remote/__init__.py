"""lmplug-remote: the L4 shared tier (``type: remote``). The URL's scheme picks a connector:
``redis://``, ``rediss://``, ``redis+cluster://``, ``s3://`` or ``lm://`` (lmplug's own server);
other plugins add schemes through ``lmplug_register_remote_schemes``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lmplug import ChunkCodec, RemoteScheme, TierType, hookimpl
from lmplug.tierkit import CliCommand
from lmplug_remote.tier import RemoteTier, RemoteTierConfig

__all__ = ["RemoteTier", "RemoteTierConfig"]

# Each connector module exposes SCHEME; imported when the plugin host registers this plugin.
CONNECTOR_MODULES: tuple[str, ...] = (
    "lmplug_remote.s3_connector",
    "lmplug_remote.redis_connector",
    "lmplug_remote.lm_connector",
)


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(
        TierType(
            name="remote",
            config_model=RemoteTierConfig,
            factory=RemoteTier,
            summary="L4 shared store: redis, redis cluster, s3, lm:// (lmplug-server); write-behind, circuit breaker",
        )
    )


@hookimpl
def lmplug_register_remote_schemes(register: Callable[[RemoteScheme[Any]], None]) -> None:
    for module in CONNECTOR_MODULES:
        register(importlib.import_module(module).SCHEME)


@hookimpl
def lmplug_register_codecs(register: Callable[[ChunkCodec], None]) -> None:
    from lmplug_remote.codecs import default_codecs

    for codec in default_codecs():
        register(codec)


@hookimpl
def lmplug_register_commands(register: Callable[[CliCommand], None]) -> None:
    from lmplug_server.cli import add_arguments, run_from_arguments

    summary = "run lmplug-server, the shared KV store of lm:// tiers"
    register(CliCommand("server", summary, add_arguments, run_from_arguments))
