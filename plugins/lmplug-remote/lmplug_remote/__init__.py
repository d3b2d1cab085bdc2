"""lmplug-remote: the L4 shared tier (``type: remote``). The URL's scheme picks a connector:
``redis://``, ``rediss://``, ``redis+cluster://``, ``s3://`` or ``lm://`` (lmplug-server);
other plugins add schemes through ``lmplug_register_remote_schemes``.

Registering imports no connector library: each scheme's connector is imported when a tier
with its URL is built, and each extra (``redis``, ``s3``, ``lm``, ``codecs``) brings what one needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from lmplug.tierkit import ChunkCodec, CliCommand, RemoteScheme, TierType, hookimpl
from lmplug_remote import lm, redis, s3
from lmplug_remote.codecs import default_codecs
from lmplug_remote.extras import library_missing
from lmplug_remote.tier import RemoteTier, RemoteTierConfig


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
    for scheme in (s3.SCHEME, redis.SCHEME, lm.SCHEME):
        register(scheme)


@hookimpl
def lmplug_register_codecs(register: Callable[[ChunkCodec], None]) -> None:
    for codec in default_codecs():
        register(codec)


@hookimpl
def lmplug_register_commands(register: Callable[[CliCommand], None]) -> None:
    summary = "run lmplug-server, the shared KV store of lm:// tiers"
    try:
        from lmplug_server import cli
    except ModuleNotFoundError as exc:
        missing = library_missing(exc, "the 'lmplug server' command and lm:// URLs", "lm")

        def unavailable(args: argparse.Namespace) -> int:
            print(f"lmplug server: {missing}", file=sys.stderr)
            return 2

        register(CliCommand("server", f"{summary} (not installed)", lambda parser: None, unavailable))
        return
    register(CliCommand("server", summary, cli.add_arguments, cli.run_from_arguments))
