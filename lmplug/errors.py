"""lmplug's exception hierarchy.

Every error lmplug raises is an :class:`LmplugError`. Library errors (OS, network, SDK)
are translated at the tier boundary into the subclass that names the condition. A cache
miss is never an error: it is ``None`` or a count of zero.
"""

from __future__ import annotations


class LmplugError(Exception):
    """Base class of every error raised by lmplug."""


class ConfigError(LmplugError, ValueError):
    """The configuration is malformed; the message names each offending key path."""


class PluginError(LmplugError):
    """A plugin could not be loaded or does not honour the hook contract."""


class PluginUnavailable(PluginError):
    """A configured tier type has no installed plugin, or its plugin failed to load."""


class PluginContractError(PluginError):
    """A plugin's hookimpls or tier object break the contract in ``lmplug.hooks.specs``."""


class InvalidInputError(LmplugError, ValueError):
    """The caller handed lmplug tokens or KV it cannot accept; nothing was changed."""


class InvalidTokensError(InvalidInputError):
    """Token ids are not a 1-D sequence of integers in ``[0, 2**31)``."""


class KVShapeError(InvalidInputError):
    """A KV tensor's shape does not match the configured layout."""


class KVDtypeError(InvalidInputError):
    """A KV tensor's dtype does not match the configured layout."""


class TokenCountMismatch(InvalidInputError):
    """The KV tensor covers a different number of tokens than the token sequence."""


class TierError(LmplugError):
    """A tier failed an operation; the pipeline degrades to a miss or a skipped write."""


class TierUnavailable(TierError):
    """A tier's backing store cannot be reached (dead server, vanished directory)."""


class CorruptChunk(TierError):
    """Stored KV failed validation (header, checksum, shape); it is dropped, never served."""


class CacheClosedError(LmplugError):
    """The cache was used after it was closed."""
