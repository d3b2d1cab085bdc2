"""The plugin kit: everything a tier, remote connector, codec or command author needs.

Plugins import from two modules only: :mod:`lmplug` (the application API and the errors)
and this one. A test (``tests/test_exports.py``) holds every plugin in ``plugins/`` to it.

- **Registering:** :data:`hookimpl`; the hook contract is :mod:`lmplug.hooks.specs`, and
  ``docs/hooks.md`` walks through writing a plugin.
- **Tiers:** :class:`Tier`, :class:`TierType`, :class:`TierContext`, :class:`TierStatistics`,
  :class:`Capability`; slow tiers start from :class:`WriteBehindTier` (a bounded write-behind
  queue, counters, ``drain`` and statistics); :func:`leading` counts the leading keys a tier holds; a peer tier serves
  :class:`LocalTiers` (``TierContext.local_tiers()``) and follows them with a :class:`HoldingsListener`.
- **Data:** :class:`ChunkKey`, :class:`KVChunk`, :class:`KVLayout`, :class:`ChunkAllocator` (and its
  :class:`AllocatorStatistics`), :class:`KVBytes`, :func:`aligned_empty`, :func:`prefault`, :data:`IO_ALIGNMENT`.
- **Bytes on disk or the wire:** :class:`ChunkHeader` (:data:`HEADER`), :func:`payload_checksum`,
  :func:`parts_checksum`, :func:`slice_parts`.
- **Remote stores:** :class:`RemoteConnector`, :class:`RemoteScheme`, :class:`ChunkCodec`,
  :class:`RawCodec`; **peers:** :class:`PeerTransport`.
- **Config:** :class:`StrictModel`, :class:`ByteSize`, :class:`Duration`, :func:`config_error`.
- **Operations:** :class:`ThrottledLog` (one warning per interval), :class:`WriteBehind` (the
  queue alone), :class:`CliCommand` (an ``lmplug`` sub-command).
- **Engine extensions** (what a request reuses beyond its exact prefix, e.g. CacheBlend):
  :class:`EngineExtensionType` registers an :class:`EngineExtension`, which sees an
  :class:`EngineRequest`, answers with a :class:`Claim` (asking its worker side through a
  :data:`ChannelCall`), and in the worker, through an :class:`EngineWorker`, carries out an
  :class:`EngineLoad` and keeps what it needs from an :class:`EngineSave`.
"""

from __future__ import annotations

from lmplug.core.commands import CliCommand
from lmplug.core.config import StrictModel, config_error
from lmplug.core.extension import (
    ChannelCall,
    Claim,
    EngineExtension,
    EngineExtensionType,
    EngineLoad,
    EngineRequest,
    EngineSave,
    EngineWorker,
)
from lmplug.core.keys import ChunkKey
from lmplug.core.layout import KVLayout
from lmplug.core.memory import IO_ALIGNMENT, AllocatorStatistics, ChunkAllocator, KVChunk, aligned_empty, prefault
from lmplug.core.remote import ChunkCodec, PeerTransport, RawCodec, RemoteConnector, RemoteScheme
from lmplug.core.reporting import ThrottledLog
from lmplug.core.serde import HEADER, ChunkHeader, parts_checksum, payload_checksum, slice_parts
from lmplug.core.tier import (
    Capability,
    HoldingsListener,
    LocalTiers,
    Tier,
    TierContext,
    TierStatistics,
    TierType,
    leading,
)
from lmplug.core.transfer import KVBytes
from lmplug.core.units import ByteSize, Duration
from lmplug.core.writebehind import Batch, WriteBehind, WriteBehindTier
from lmplug.hooks.markers import hookimpl

__all__ = [
    "HEADER",
    "IO_ALIGNMENT",
    "AllocatorStatistics",
    "Batch",
    "ByteSize",
    "Capability",
    "ChannelCall",
    "ChunkAllocator",
    "ChunkCodec",
    "ChunkHeader",
    "ChunkKey",
    "Claim",
    "CliCommand",
    "Duration",
    "EngineExtension",
    "EngineExtensionType",
    "EngineLoad",
    "EngineRequest",
    "EngineSave",
    "EngineWorker",
    "HoldingsListener",
    "KVBytes",
    "KVChunk",
    "KVLayout",
    "LocalTiers",
    "PeerTransport",
    "RawCodec",
    "RemoteConnector",
    "RemoteScheme",
    "StrictModel",
    "ThrottledLog",
    "Tier",
    "TierContext",
    "TierStatistics",
    "TierType",
    "WriteBehind",
    "WriteBehindTier",
    "aligned_empty",
    "prefault",
    "config_error",
    "hookimpl",
    "leading",
    "parts_checksum",
    "payload_checksum",
    "slice_parts",
]
