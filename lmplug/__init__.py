"""lmplug: a KV-cache layer for LLM inference engines, built from plugins.

Application API::

    async with lmplug.open_cache(config) as cache:
        n = await cache.lookup(tokens)
        await cache.store(tokens, kv)
        kv, n = await cache.retrieve(tokens)

    with lmplug.SyncCache(config) as cache: ...

Plugin authors import from :mod:`lmplug.tierkit` (tiers, connectors, codecs, commands) and
read the hook contract in :mod:`lmplug.hooks.specs`; every error is here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lmplug.core.cache import Cache, CacheStatistics, open_cache
from lmplug.core.config import LmplugConfig, ModelConfig, TierConfig, load_config
from lmplug.core.leases import Lease
from lmplug.core.memory import empty_kv
from lmplug.core.sync import SyncCache
from lmplug.errors import (
    CacheClosedError,
    ConfigError,
    CorruptChunk,
    InvalidInputError,
    InvalidTokensError,
    KVDtypeError,
    KVShapeError,
    LmplugError,
    PluginContractError,
    PluginError,
    PluginUnavailable,
    TierError,
    TierUnavailable,
    TokenCountMismatch,
)
from lmplug.hooks.manager import PluginHost

try:
    __version__ = version("lmplug")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "Cache",
    "CacheClosedError",
    "CacheStatistics",
    "ConfigError",
    "CorruptChunk",
    "InvalidInputError",
    "InvalidTokensError",
    "KVDtypeError",
    "KVShapeError",
    "Lease",
    "LmplugConfig",
    "LmplugError",
    "ModelConfig",
    "PluginContractError",
    "PluginError",
    "PluginHost",
    "PluginUnavailable",
    "SyncCache",
    "TierConfig",
    "TierError",
    "TierUnavailable",
    "TokenCountMismatch",
    "__version__",
    "empty_kv",
    "load_config",
    "open_cache",
]
