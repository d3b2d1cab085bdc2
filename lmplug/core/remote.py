"""The contracts of shared-store plugins: remote connectors and chunk codecs.

A *remote connector* moves opaque blobs by string key to and from one store (a Redis
server, an S3 bucket, an ``lmplug-server``). It knows nothing of KV: the ``remote`` tier
(``lmplug-remote``) frames chunks, verifies what comes back, and adds timeouts, retries
and a circuit breaker around it. A plugin offers connectors for URL schemes through the
``lmplug_register_remote_schemes`` hook.

A *chunk codec* turns a chunk's KV into the bytes a shared store keeps, and back:
``raw`` (the bytes themselves), lossless compression, or lossy quantization. A plugin
offers codecs through the ``lmplug_register_codecs`` hook.

Connectors run on the cache's event loop under asyncio or trio; an asyncio-only client
library must be reached through a path that also works under trio.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import torch
from pydantic import BaseModel

from lmplug.errors import CorruptChunk

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class RemoteConnector(abc.ABC):
    """A client of one remote store; an async context manager that opens and closes it.

    Failures raise :class:`lmplug.errors.TierUnavailable` (the store cannot be reached or
    answered with an error); a missing key is never an error. The remote tier bounds every
    call with its own timeout and cancels it when that passes, so a connector need not.
    """

    url: str

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Prepare the client. It may connect lazily: a store that is down now is not an error here."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection and stop any helper thread. Idempotent."""

    @abc.abstractmethod
    async def put_many(self, entries: Sequence[tuple[str, Sequence[memoryview]]], ttl: float | None) -> None:
        """Store each ``(key, parts)``: the concatenation of ``parts`` under ``key`` (overwriting),
        expiring after ``ttl`` s; the remote tier's writers call this with a batch.

        A reader must never see half an entry: the store replaces each value atomically.
        ``parts`` are views of chunk memory; send them without joining where the client allows,
        and several values per round trip where the store can. When it raises, any prefix of
        ``entries`` may have been stored.
        """

    async def put(self, key: str, parts: Sequence[memoryview], ttl: float | None) -> None:
        """Store one value, as :meth:`put_many` does."""
        await self.put_many([(key, parts)], ttl)

    @abc.abstractmethod
    async def get_into(self, key: str, parts: Sequence[memoryview]) -> int | None:
        """Read ``key``'s value into ``parts``, filled in order; the value's length, or ``None`` on a miss.

        A value longer than ``sum(len(p) for p in parts)`` raises :class:`lmplug.errors.CorruptChunk`
        (nothing of that size was stored by lmplug); a shorter one fills a prefix.
        """

    @abc.abstractmethod
    async def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key holds a value, in one round trip where the store allows."""

    @abc.abstractmethod
    async def delete(self, keys: Sequence[str]) -> int:
        """Remove the keys; how many existed (best effort where the store cannot say)."""

    async def health(self) -> None:
        """Raise :class:`lmplug.errors.TierUnavailable` unless the store answers (default: an ``exists``)."""
        await self.exists(["lmplug:health"])

    def statistics(self) -> dict[str, float]:
        """Connector-specific counters (reconnects, bytes moved, ...) for metrics and ``statistics()``."""
        return {}


@dataclass(frozen=True, slots=True)
class RemoteScheme(Generic[ConfigT]):
    """URL schemes a plugin serves: the options model of their ``connector:`` section and the factory.

    ``factory(url, options)`` builds a connector (without connecting); it raises
    :class:`lmplug.errors.ConfigError` for a URL it cannot use.
    """

    schemes: tuple[str, ...]
    config_model: type[ConfigT]
    factory: Callable[[str, ConfigT], RemoteConnector]
    summary: str = ""


@dataclass(frozen=True, slots=True)
class PeerTransport:
    """A way to move chunks between instances of the engine, which a peer tier picks by ``name``.

    ``factory`` builds it; its arguments and what it returns are the peer tier's contract, not
    the core's (lmplug-p2p: ``factory(settings: TransportSettings) -> Transport``, see its
    ``transfer`` module), so that another package (NIXL, RDMA) adds a transport without
    touching the tier.
    """

    name: str
    factory: Callable[..., Any]
    summary: str = ""


class ChunkCodec(abc.ABC):
    """How a chunk's KV is kept in a shared store. Instances are stateless and thread-safe.

    ``encode``/``decode`` run in worker threads; they work on CPU tensors of the chunk
    shape ``[2, layers, tokens, hidden]``.
    """

    name: str
    """What a tier's ``codec:`` option says; also part of every stored key, so a reader
    configured with another codec misses instead of decoding foreign bytes."""
    lossy: bool = False
    """True when ``decode(encode(kv))`` only approximates ``kv``."""

    def prepare(self) -> None:
        """Load what encoding needs (an optional library); the remote tier calls it when it is built
        with this codec. Raise :class:`lmplug.errors.PluginUnavailable`, naming what to install,
        when something is missing. The default has nothing to load."""
        return None

    @abc.abstractmethod
    def max_encoded_size(self, kv: torch.Size, dtype: torch.dtype) -> int:
        """An upper bound of ``len(encode(kv))`` for KV of this shape and dtype."""

    @abc.abstractmethod
    def encode(self, kv: torch.Tensor) -> memoryview:
        """The stored bytes of ``kv`` (a view of ``kv`` itself when nothing changes)."""

    @abc.abstractmethod
    def decode(self, data: memoryview, out: torch.Tensor) -> None:
        """Fill ``out`` from ``data``; :class:`lmplug.errors.CorruptChunk` when ``data`` cannot be decoded."""


class RawCodec(ChunkCodec):
    """The KV bytes themselves, zero-copy in both directions."""

    name = "raw"

    def max_encoded_size(self, kv: torch.Size, dtype: torch.dtype) -> int:
        return kv.numel() * dtype.itemsize

    def encode(self, kv: torch.Tensor) -> memoryview:
        return kv.contiguous().view(torch.uint8).reshape(-1).numpy().data.cast("B")

    def decode(self, data: memoryview, out: torch.Tensor) -> None:
        target = out.view(torch.uint8).reshape(-1).numpy().data.cast("B")
        if len(data) != len(target):
            raise CorruptChunk(f"raw chunk of {len(data)} bytes, {len(target)} expected")
        target[:] = data
