"""lmplug-p2p: the ``p2p`` tier (KV fetched from other instances' host memory, found through
``lmplug controller``) and the transfer layer it serves and fetches with."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmplug.tierkit import TierContext, TierType, hookimpl
from lmplug_p2p.options import P2PTierConfig

if TYPE_CHECKING:
    from lmplug_p2p.tier import P2PTier

__all__ = ["P2PTierConfig", "build"]


def build(context: TierContext, options: P2PTierConfig) -> P2PTier:
    """The tier's factory (imports the tier, the controller client and pyzmq only when a cache uses it)."""
    from lmplug_p2p.tier import P2PTier

    return P2PTier(context, options)


@hookimpl
def lmplug_register_tier_types(register: Callable[[TierType[Any]], None]) -> None:
    register(
        TierType(
            name="p2p",
            config_model=P2PTierConfig,
            factory=build,
            summary="L2 peers: KV other instances computed, found through lmplug controller, fetched from their memory",
        )
    )
