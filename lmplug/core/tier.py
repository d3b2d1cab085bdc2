"""What a tier is: the object a tier plugin's factory returns.

A tier holds chunks of KV somewhere (host memory, disk, a remote store). It implements
the async data-path hooks of :mod:`lmplug.hooks.specs` as methods marked with
``@lmplug.tierkit.hookimpl``; the cache registers each configured tier object with its plugin
manager and awaits those methods in pipeline order. A tier that cannot do something says
so in :attr:`Tier.capabilities` rather than raising ``NotImplementedError``.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

import torch
from pydantic import BaseModel

from lmplug.core.keys import ChunkKey
from lmplug.core.layout import KVLayout
from lmplug.core.memory import ChunkAllocator, KVChunk
from lmplug.core.transfer import copy_from_chunks
from lmplug.hooks.markers import hookimpl

if TYPE_CHECKING:
    from lmplug.core.config import LmplugConfig
    from lmplug.core.remote import ChunkCodec, PeerTransport, RemoteScheme


logger = logging.getLogger("lmplug.tier")


class Registries(Protocol):
    """What a tier may look up among the cache's plugins (the plugin host satisfies it)."""

    def resolve_remote_scheme(self, scheme: str) -> RemoteScheme[Any]: ...

    def resolve_codec(self, name: str) -> ChunkCodec: ...

    def resolve_transport(self, name: str) -> PeerTransport: ...


class Capability(enum.Enum):
    """What a tier can do beyond the required hooks."""

    PROVIDES_ALLOCATOR = "provides_allocator"
    """The tier owns a host pool; the pipeline allocates every chunk from it."""
    PERSISTENT = "persistent"
    """Chunks survive a restart of the process."""
    SHARED = "shared"
    """Other processes or machines see what this tier stores."""
    WRITE_BEHIND = "write_behind"
    """``lmplug_store`` queues the write and returns before it is durable. A store never asks
    such a tier which chunks it holds (its ``lmplug_contains`` may be slow): it is offered
    chunks it may have already, and its queued writes skip those."""
    RETRIEVE_INTO = "retrieve_into"
    """The tier implements ``lmplug_retrieve_into``: it reads straight into a caller's KV buffer."""
    LISTS_KEYS = "lists_keys"
    """The tier implements ``lmplug_held_keys``: it can list every key it holds (what a peer tier
    advertises after it registers)."""
    PEER = "peer"
    """The tier fetches chunks from other instances of the engine. What this instance serves to
    its peers never comes from such a tier (no fetch loops between instances)."""
    PUSH = "push"
    """The tier implements ``lmplug_push``: it sends chunks this instance holds to another
    instance (``Cache.push``; the PD sender)."""


@dataclass(frozen=True, slots=True)
class TierStatistics:
    """A snapshot of one tier's state and counters."""

    name: str
    type: str
    chunks: int
    used_bytes: int
    capacity_bytes: int | None
    hits: int = 0
    misses: int = 0
    stored: int = 0
    evictions: int = 0
    errors: int = 0
    pinned: int = 0
    pending_writes: int = 0
    skipped_writes: int = 0


class HoldingsListener(Protocol):
    """Told what the tiers of one cache admit and drop (a peer tier advertises it to a controller).

    Both methods run synchronously on the cache's event-loop thread, right after the tier
    admitted or dropped the keys; they must be quick and must not raise.
    """

    def admitted(self, tier: str, keys: Sequence[ChunkKey]) -> None: ...

    def evicted(self, tier: str, keys: Sequence[ChunkKey]) -> None: ...


class Holdings:
    """One cache's news of what its tiers admit and drop: passed on to ``sink`` (the cache's
    ``lmplug_chunks_admitted`` / ``lmplug_chunks_evicted`` hooks) and to every watcher."""

    def __init__(self, sink: HoldingsListener) -> None:
        self._sink = sink
        self._watchers: list[HoldingsListener] = []

    def watch(self, listener: HoldingsListener) -> Callable[[], None]:
        """Tell ``listener`` from now on; returns the call that stops it."""
        self._watchers.append(listener)
        return lambda: self._watchers.remove(listener) if listener in self._watchers else None

    def admitted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        if keys:
            self._sink.admitted(tier, keys)
            for watcher in tuple(self._watchers):
                try:
                    watcher.admitted(tier, keys)
                except Exception:  # a listener's bug must not fail the tier's store
                    logger.exception("a holdings watcher failed on admitted chunks")

    def evicted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        if keys:
            self._sink.evicted(tier, keys)
            for watcher in tuple(self._watchers):
                try:
                    watcher.evicted(tier, keys)
                except Exception:
                    logger.exception("a holdings watcher failed on evicted chunks")


class LocalTiers(Protocol):
    """The tiers of a cache that hold chunks in this instance (neither :attr:`Capability.PEER`
    nor :attr:`Capability.SHARED` ones): what a peer tier serves to other instances."""

    names: tuple[str, ...]

    async def contains(self, keys: Sequence[ChunkKey]) -> int:
        """Leading keys they hold, as the pipeline counts them."""
        ...

    async def retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        """Chunks of the leading keys they hold (waterfall and promotion among them), one
        reference each for the caller. Chunks are checked against the layout; their token
        counts are their own (a key does not say how many tokens its chunk holds)."""
        ...

    async def held_keys(self) -> dict[str, list[ChunkKey]]:
        """Every key each of them holds, by tier name (tiers that declare :attr:`Capability.LISTS_KEYS`)."""
        ...

    async def store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        """Offer chunks to them (write-all), e.g. chunks fetched from a peer on a controller's command."""
        ...

    async def evict(self, keys: Sequence[ChunkKey], tiers: Collection[str] | None = None) -> dict[str, int]:
        """Drop keys from them (or from the named ones); how many each dropped."""
        ...

    def statistics(self) -> tuple[TierStatistics, ...]:
        """Their statistics, in pipeline order."""
        ...


@dataclass(slots=True)
class TierContext:
    """What the core hands a tier factory: its name, the cache config and KV layout, and callbacks."""

    name: str
    type: str
    config: LmplugConfig
    layout: KVLayout
    fingerprint: bytes
    _holdings: Holdings = field(repr=False)
    """The cache's news of admitted and dropped chunks."""
    plugins: Registries | None = field(default=None, repr=False)
    """The remote schemes and codecs the cache's plugins offer (for tiers that look them up)."""
    _allocator: ChunkAllocator | None = field(default=None, repr=False)
    _local: Callable[[], LocalTiers] | None = field(default=None, repr=False)

    @property
    def allocator(self) -> ChunkAllocator:
        """The pipeline's chunk allocator (available once every tier is built)."""
        if self._allocator is None:
            raise RuntimeError("the chunk allocator is bound after every tier is constructed")
        return self._allocator

    def bind_allocator(self, allocator: ChunkAllocator) -> None:
        """Called by the cache once every tier is built and the pipeline's allocator is chosen."""
        self._allocator = allocator

    def bind_local_tiers(self, local: Callable[[], LocalTiers]) -> None:
        """Called by the cache once the pipeline is built (see :meth:`local_tiers`)."""
        self._local = local

    def local_tiers(self) -> LocalTiers:
        """The cache's tiers that hold chunks in this instance, this one excluded. Bound once the
        whole pipeline is built: after the tiers' ``__aenter__`` (which may hand out a callback that
        calls this later), before the first hook call."""
        if self._local is None:
            raise RuntimeError("the local tiers are bound once the whole pipeline is built")
        return self._local()

    def report_admitted(self, keys: Sequence[ChunkKey]) -> None:
        """Tell the cache (``lmplug_chunks_admitted`` listeners, watchers) that this tier now holds ``keys``."""
        self._holdings.admitted(self.name, keys)

    def report_evicted(self, keys: Sequence[ChunkKey]) -> None:
        """Tell the cache (``lmplug_chunks_evicted`` listeners, watchers) that this tier dropped ``keys``."""
        self._holdings.evicted(self.name, keys)

    def watch(self, listener: HoldingsListener) -> Callable[[], None]:
        """Tell ``listener`` what every tier of this cache admits and drops from now on (a peer tier
        advertises it); returns the call that stops it."""
        return self._holdings.watch(listener)


def leading(keys: Sequence[ChunkKey], held: Callable[[ChunkKey], bool]) -> int:
    """How many of ``keys``, from the first, ``held`` says a tier holds (what ``lmplug_contains`` answers)."""
    found = 0
    for key in keys:
        if not held(key):
            break
        found += 1
    return found


class Tier(abc.ABC):
    """Base class of tier objects. Subclasses mark their hook methods with ``@lmplug.tierkit.hookimpl``."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset()

    def __init__(self, context: TierContext) -> None:
        self.context = context

    @property
    def name(self) -> str:
        return self.context.name

    @property
    def allocator(self) -> ChunkAllocator | None:
        """The tier's host pool when it declares :attr:`Capability.PROVIDES_ALLOCATOR`."""
        return None

    @abc.abstractmethod
    def statistics(self) -> TierStatistics:
        """A snapshot of the tier's usage and counters (cheap, never blocks)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:  # noqa: B027 - holding nothing is a valid default
        """Release everything the tier holds. Idempotent."""

    async def drain(self) -> None:  # noqa: B027 - a tier without write-behind has nothing to wait for
        """Wait until every write accepted so far is done (write-behind tiers override this)."""

    @abc.abstractmethod
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int: ...

    @abc.abstractmethod
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]: ...

    @abc.abstractmethod
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None: ...

    @abc.abstractmethod
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int: ...

    async def retrieve_by_copy(self, keys: Sequence[ChunkKey], out: torch.Tensor) -> int:
        """``lmplug_retrieve``, then the chunks copied into ``out``: how ``lmplug_retrieve_into``
        serves memory the tier cannot read into itself (a CUDA ``out``, for instance)."""
        chunks = await self.lmplug_retrieve(keys)
        try:
            copy_from_chunks(chunks, out)
            if out.is_cuda and chunks:
                torch.cuda.current_stream(out.device).synchronize()  # the copies read the chunks
        finally:
            for chunk in chunks:
                chunk.release()
        return len(chunks)

    @hookimpl
    async def lmplug_transfer(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk], source: str) -> int:
        """By default a tier admits transferred chunks as it would stored ones."""
        await self.lmplug_store(keys, chunks)
        return await self.lmplug_contains(keys)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class TierType(Generic[ConfigT]):
    """A tier type a plugin offers: the ``type:`` name, its config model and its factory."""

    name: str
    config_model: type[ConfigT]
    factory: Callable[[TierContext, ConfigT], Tier]
    summary: str = ""
