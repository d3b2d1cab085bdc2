"""lmplug-p2p: the ``p2p`` tier (KV fetched from other instances' host memory, found through
``lmplug controller``) and the transfer layer it serves and fetches with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmplug.tierkit import PeerTransport, TierType, hookimpl
from lmplug_p2p.options import P2PTierConfig
from lmplug_p2p.tier import P2PTier
from lmplug_p2p.transfer import TcpTransport

__all__ = ["P2PTier", "P2PTierConfig"]


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(
        TierType(
            name="p2p",
            config_model=P2PTierConfig,
            factory=P2PTier,
            summary="L2 peers: KV other instances computed, found through lmplug controller, fetched from their memory",
        )
    )


@hookimpl
def lmplug_register_transports(register: Callable[[PeerTransport], None]) -> None:
    register(
        PeerTransport(
            name=TcpTransport.name,
            factory=TcpTransport,
            summary="LMPX frames over TCP, zero-copy sockets: any host, no special hardware",
        )
    )
