"""lmplug: a KV-cache layer for LLM inference engines, built from plugins.

Public API::

    async with lmplug.open_cache(config) as cache:
        n = await cache.lookup(tokens)
        await cache.store(tokens, kv)
        kv, n = await cache.retrieve(tokens)

    with lmplug.SyncCache(config) as cache: ...

Plugin authors need :data:`hookimpl`, :class:`Tier`, :class:`TierType`, :class:`TierContext`
and the hook contract in :mod:`lmplug.hooks.specs`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lmplug.core.cache import Cache, CacheStatistics, open_cache
from lmplug.core.config import LmplugConfig, ModelConfig, StrictModel, TierConfig, load_config
from lmplug.core.keys import ChunkKey, KeyMaker, canonical_tokens
from lmplug.core.layout import KVLayout
from lmplug.core.leases import Lease
from lmplug.core.memory import (
    IO_ALIGNMENT,
    AllocatorStatistics,
    ChunkAllocator,
    HeapAllocator,
    KVChunk,
    aligned_empty,
    cuda_available,
    empty_kv,
)
from lmplug.core.remote import ChunkCodec, RawCodec, RemoteConnector, RemoteScheme
from lmplug.core.sync import SyncCache
from lmplug.core.tier import Capability, Tier, TierContext, TierStatistics, TierType
from lmplug.core.transfer import KVBytes
from lmplug.core.units import ByteSize, Duration, parse_duration, parse_size
from lmplug.errors import (
    CapacityExceeded,
    ConfigError,
    CorruptChunk,
    InvalidInputError,
    LmplugError,
    PluginUnavailable,
    TierError,
    TierUnavailable,
)
from lmplug.hooks.manager import PluginHost
from lmplug.hooks.markers import hookimpl, hookspec

try:
    __version__ = version("lmplug")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "IO_ALIGNMENT",
    "AllocatorStatistics",
    "ByteSize",
    "Cache",
    "CacheStatistics",
    "Capability",
    "CapacityExceeded",
    "ChunkAllocator",
    "ChunkCodec",
    "ChunkKey",
    "ConfigError",
    "CorruptChunk",
    "Duration",
    "HeapAllocator",
    "InvalidInputError",
    "KVBytes",
    "KVChunk",
    "KVLayout",
    "KeyMaker",
    "Lease",
    "LmplugConfig",
    "LmplugError",
    "ModelConfig",
    "PluginHost",
    "PluginUnavailable",
    "RawCodec",
    "RemoteConnector",
    "RemoteScheme",
    "StrictModel",
    "SyncCache",
    "Tier",
    "TierConfig",
    "TierContext",
    "TierError",
    "TierStatistics",
    "TierType",
    "TierUnavailable",
    "__version__",
    "aligned_empty",
    "canonical_tokens",
    "cuda_available",
    "empty_kv",
    "hookimpl",
    "hookspec",
    "load_config",
    "open_cache",
    "parse_duration",
    "parse_size",
]
