"""The cache: tokens and KV tensors in, chunks through the tier pipeline, KV tensors out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType

import anyio
import numpy as np
import torch

from lmplug.core.composer import compose
from lmplug.core.config import ConfigSource, LmplugConfig, load_config
from lmplug.core.keys import ChunkKey, KeyMaker, canonical_tokens
from lmplug.core.layout import KVLayout
from lmplug.core.leases import Lease, LeaseTable
from lmplug.core.memory import AllocatorStatistics, ChunkAllocator, KVChunk
from lmplug.core.metrics import CacheMetrics
from lmplug.core.partials import ROOT, PartialIndex
from lmplug.core.reporting import ThrottledLog
from lmplug.core.tier import Holdings, TierStatistics
from lmplug.core.transfer import copy_from_chunks, copy_into_chunks
from lmplug.errors import CacheClosedError, InvalidInputError, KVShapeError
from lmplug.hooks.manager import PluginHost

logger = logging.getLogger("lmplug.cache")


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of the cache: each tier, the chunk allocator, active leases."""

    tiers: tuple[TierStatistics, ...]
    allocator: AllocatorStatistics
    leases: int


class Cache:
    """A KV cache over the configured tier stack.

    Open it with ``async with lmplug.open_cache(config) as cache``. Every method runs on
    the event loop that opened it (asyncio or trio); engines that call synchronously use
    :class:`lmplug.SyncCache`.
    """

    def __init__(
        self,
        config: ConfigSource = None,
        *,
        plugins: PluginHost | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._source = config
        self._plugins = plugins
        self._environ = environ
        self._stack: AsyncExitStack | None = None
        self._entered = False
        self._open = False
        self._warnings = ThrottledLog(logger)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Cache:
        if self._entered:
            raise RuntimeError("a Cache can be opened only once")
        self._entered = True
        self.config: LmplugConfig = load_config(self._source, environ=self._environ)
        self.plugins = self._plugins or PluginHost.from_environment(self._environ)
        self.layout = KVLayout.from_model(self.config.model)
        self.keymaker = KeyMaker(self.config)
        self._leases = LeaseTable(self._lease_expired)
        self._partials = PartialIndex()
        stack = AsyncExitStack()
        self._stack = stack
        try:
            self.pipeline = await compose(
                self.config,
                self.plugins,
                self.layout,
                self.keymaker.fingerprint,
                Holdings(_HookHoldings(self.plugins)),
                self._report_tier_failure,
                stack,
            )
            self.allocator: ChunkAllocator = self.pipeline.allocator
            self.metrics = CacheMetrics(self._tier_statistics)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group = task_group
            stack.callback(task_group.cancel_scope.cancel)
            stack.callback(self._leases.release_all)
            task_group.start_soon(self._leases.run)
        except BaseException:
            await stack.aclose()
            raise
        self._open = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release every lease, stop background work and close every tier. Idempotent."""
        self._open = False
        stack, self._stack = self._stack, None
        if stack is not None:
            # Not shielded here: the stack holds the task group, whose scope must exit as it was
            # entered; tiers shield their own awaits in aclose().
            await stack.aclose()

    def _check_open(self) -> None:
        if not self._open:
            raise CacheClosedError("the cache is not open (use `async with lmplug.open_cache(config) as cache`)")

    # ------------------------------------------------------------------ data path

    def keys(self, tokens: object, *, domain: str | None = None) -> list[ChunkKey]:
        """The chunk keys of ``tokens`` under this cache's configuration (in key ``domain``)."""
        self._check_open()
        return self.keymaker.in_domain(domain).keys(tokens)

    def _token_counts(self, num_tokens: int, num_keys: int) -> list[int]:
        size = self.config.chunk_size
        counts = [size] * num_keys
        if num_keys and num_keys * size > num_tokens:
            counts[-1] = num_tokens - (num_keys - 1) * size
        return counts

    def _candidates(self, array: np.ndarray, domain: str | None) -> tuple[list[ChunkKey], list[int]]:
        """The keys a read of ``array`` tries first, and their token counts: every full chunk,
        plus the trailing partial chunk as it stands (when partial chunks are kept)."""
        keys = self.keymaker.in_domain(domain).keys_of_canonical(array)
        return keys, self._token_counts(array.size, len(keys))

    def _partials_at(
        self, array: np.ndarray, keys: Sequence[ChunkKey], position: int, domain: str | None = None
    ) -> list[tuple[ChunkKey, int]]:
        """Partial chunks this cache stored at chunk ``position`` of ``array`` (after ``keys[position - 1]``)
        whose tokens are ``array``'s tokens there: ``(key, tokens)``, longest first. None in a key
        domain: its sequences are looked up whole."""
        if not self.config.save_partial_chunks or domain is not None:
            return []
        previous = keys[position - 1] if position else ROOT
        entries = self._partials.at(previous)
        if not entries:
            return []
        begin = position * self.config.chunk_size
        room = array.size - begin
        found: list[tuple[ChunkKey, int]] = []
        for length in sorted(set(entries.values()), reverse=True):
            if length <= room:
                key = self.keymaker.key_after(previous, array[begin : begin + length])
                if entries.get(key) == length:
                    found.append((key, length))
        return found

    async def _held(self, array: np.ndarray, domain: str | None) -> tuple[list[ChunkKey], list[int]]:
        """The leading keys of ``array`` that the pipeline holds (no data moves), and their token counts."""
        keys, sizes = self._candidates(array, domain)
        found = await self.pipeline.contains(keys) if keys else 0
        if found == len(keys):
            return keys, sizes
        keys, sizes = keys[:found], sizes[:found]  # whole chunks only: a partial key is always last
        for key, length in self._partials_at(array, keys, found, domain):
            if await self.pipeline.contains([key]):
                return [*keys, key], [*sizes, length]
            self._partials.discard(keys[found - 1] if found else ROOT, key)  # gone from every tier
        return keys, sizes

    def _note_stored(
        self, array: np.ndarray, keys: Sequence[ChunkKey], first: int, stop: int, domain: str | None
    ) -> None:
        """Chunks ``first..stop-1`` of ``array`` are now cached: index the partial ones, and evict the
        partial chunks they supersede (the same tokens, now part of a longer chunk). Not in a key
        domain, whose sequences are looked up whole."""
        if not self.config.save_partial_chunks or domain is not None:
            return
        size = self.config.chunk_size
        superseded: list[ChunkKey] = []
        for index in range(first, stop):
            previous = keys[index - 1] if index else ROOT
            begin = index * size
            length = min(size, array.size - begin)
            entries = self._partials.at(previous)
            for key, shorter in entries.items():
                if shorter < length and self.keymaker.key_after(previous, array[begin : begin + shorter]) == key:
                    superseded.append(key)
                    self._partials.discard(previous, key)
            if length < size:
                self._partials.add(previous, keys[index], length)
        if superseded:
            # Off the store path: a lower tier's evict may be a file unlink or a network call.
            self._task_group.start_soon(self._evict_quietly, superseded)

    async def _evict_quietly(self, keys: list[ChunkKey]) -> None:
        if self._open:
            await self.pipeline.evict(keys)

    async def lookup(self, tokens: object, *, domain: str | None = None) -> int:
        """How many leading tokens of ``tokens`` have their KV cached (contiguous from token 0).

        Besides whole chunks, a partial chunk this cache stored counts when ``tokens`` extend its
        tokens (a prompt that continues an earlier prompt and its answer). With ``domain``, the
        keys of that key domain (:meth:`KeyMaker.in_domain`; the trailing partial chunk is keyed
        as it stands) are asked instead of the prefix keys; this holds for every method here.
        """
        self._check_open()
        array = canonical_tokens(tokens)
        _, sizes = await self._held(array, domain)
        hit = sum(sizes)
        counts = self.metrics.counts
        counts.lookups += 1
        counts.lookup_tokens += array.size
        counts.lookup_hit_tokens += hit
        return hit

    async def store(self, tokens: object, kv: torch.Tensor, *, start: int = 0, domain: str | None = None) -> int:
        """Store the KV of ``tokens``; ``kv`` is ``[2, layers, len(tokens) - start, kv_heads*head_size]``.

        ``start`` (a multiple of ``chunk_size``) skips chunks stored before, as an engine
        does when it saves a growing prompt step by step; ``kv`` then covers
        ``tokens[start:]``. Chunks that every tier consulted on this path already holds are
        skipped (write-behind tiers skip duplicates themselves, off the caller's path). With
        ``save_partial_chunks``, a trailing partial chunk is stored too, and a partial chunk
        stored earlier whose tokens this store covers with a longer chunk is evicted (in the
        background). Returns how many leading tokens are cached after the call (fewer than
        offered when memory ran out: a store never blocks and never evicts what is pinned
        or in use).
        """
        self._check_open()
        array = canonical_tokens(tokens)
        size = self.config.chunk_size
        if start < 0 or start % size or start > array.size:
            raise InvalidInputError(f"start={start} must be a multiple of chunk_size {size} within the tokens")
        kv = self.layout.check(kv, array.size - start)
        keys = self.keymaker.in_domain(domain).keys_of_canonical(array)
        first = start // size
        if len(keys) <= first:
            return min(len(keys) * size, array.size)
        held = first + await self.pipeline.held_by_all(keys[first:])
        chunks: list[KVChunk] = []
        allocate = self.allocator.allocate
        try:
            for index in range(held, len(keys)):
                chunk = allocate(min(size, array.size - index * size))
                if chunk is None:
                    break
                chunks.append(chunk)
            if chunks:
                copy_into_chunks(kv, held * size - start, chunks)
                if kv.is_cuda:
                    torch.cuda.current_stream(kv.device).synchronize()
                await self.pipeline.store(keys[held : held + len(chunks)], chunks)
        finally:
            for chunk in chunks:
                chunk.release()
        self._note_stored(array, keys, first, held + len(chunks), domain)
        counts = self.metrics.counts
        counts.stores += 1
        for chunk in chunks:
            counts.stored_tokens += chunk.num_tokens
            counts.stored_bytes += chunk.nbytes
        cached = held + len(chunks)
        if chunks and held > first:
            # Making room for the new chunks may have evicted the held ones before them (they
            # were not in use): then only what still leads is cached.
            still = first + await self.pipeline.held_by_all(keys[first:held])
            if still < held:
                cached = still
        return min(cached * size, array.size)

    async def retrieve(
        self, tokens: object, *, out: torch.Tensor | None = None, domain: str | None = None
    ) -> tuple[torch.Tensor, int]:
        """The KV of the leading cached tokens of ``tokens``: ``(kv, n)``, ``n`` possibly 0.

        ``kv`` is ``[2, layers, n, hidden]``. With ``out`` (a tensor of this layout covering
        at least ``len(tokens)`` tokens, on the CPU or a CUDA device) the KV is written into
        it and a view of its first ``n`` tokens is returned; ``out``'s tokens from ``n`` to
        ``len(tokens)`` may have been written too (with KV that a tier read but could not
        verify), and none after them. On the CPU,
        ``out`` memory aligned to 4 KiB (:func:`lmplug.empty_kv`) lets a disk tier read into
        it with O_DIRECT, without a copy.
        """
        self._check_open()
        array = canonical_tokens(tokens)
        keys, sizes = self._candidates(array, domain)
        size = self.config.chunk_size
        if out is not None:
            if out.dim() != 4 or out.shape[2] < array.size:
                raise KVShapeError(f"out has shape {list(out.shape)}; it must cover {array.size} tokens")
            self.layout.check(out, int(out.shape[2]))
            num_tokens = 0
            if keys:
                target = out if out.shape[2] == array.size else out.narrow(2, 0, array.size)
                num_tokens = await self.pipeline.retrieve_into(keys, sizes, target)
                if num_tokens < array.size and num_tokens % size == 0:
                    full = num_tokens // size
                    for key, length in self._partials_at(array, keys, full, domain):
                        rest = target.narrow(2, num_tokens, length)
                        if await self.pipeline.retrieve_into([key], [length], rest):
                            num_tokens += length
                            break
                if out.is_cuda:
                    torch.cuda.current_stream(out.device).synchronize()
        else:
            chunks = await self.pipeline.retrieve(keys, sizes) if keys else []
            try:
                num_tokens = sum(chunk.num_tokens for chunk in chunks)
                if num_tokens < array.size and num_tokens % size == 0:
                    for key, length in self._partials_at(array, keys, len(chunks), domain):
                        more = await self.pipeline.retrieve([key], [length])
                        if more:
                            chunks += more
                            num_tokens += length
                            break
                out = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype)
                copy_from_chunks(chunks, out)
            finally:
                for chunk in chunks:
                    chunk.release()
        counts = self.metrics.counts
        counts.retrieves += 1
        counts.retrieved_tokens += num_tokens
        counts.retrieved_bytes += num_tokens * self.layout.bytes_per_token
        return (out if out.shape[2] == num_tokens else out.narrow(2, 0, num_tokens)), num_tokens

    async def lease(self, tokens: object, *, ttl: float | None = None, domain: str | None = None) -> Lease:
        """Pin the leading cached chunks of ``tokens`` in host memory for ``ttl`` seconds or until released.

        Chunks found in lower tiers are promoted on the way, so the lease holds every chunk
        when this returns (:meth:`start_lease` returns before the promotion is done).
        ``lease.num_tokens`` may be 0.
        """
        lease = await self.start_lease(tokens, ttl=ttl, domain=domain)
        await lease.ready.wait()
        return lease

    async def start_lease(self, tokens: object, *, ttl: float | None = None, domain: str | None = None) -> Lease:
        """A lease over the leading cached chunks of ``tokens`` that host memory holds now (no I/O).

        The pipeline is asked what it holds (``contains``; no data moves); chunks that only
        lower tiers hold are promoted in the background, in the cache's task group, and
        added to the lease as they arrive (``lease.num_tokens`` grows, contiguously);
        ``lease.ready`` is set when nothing more will come. Releasing the lease early is
        safe: chunks that arrive later are released at once.
        """
        self._check_open()
        array = canonical_tokens(tokens)
        keys, sizes = await self._held(array, domain)
        lease = self._leases.grant([], 0, self.config.lease_timeout if ttl is None else ttl)

        def sink(chunks: list[KVChunk]) -> None:
            lease.extend(chunks, sum(chunk.num_tokens for chunk in chunks))

        taken = await self.pipeline.take_resident(keys, sizes, sink) if keys else 0
        if taken < len(keys):
            self._task_group.start_soon(self._promote_into, lease, keys[taken:], sizes[taken:], sink)
        else:
            lease.ready.set()
        return lease

    async def _promote_into(
        self, lease: Lease, keys: list[ChunkKey], sizes: list[int], sink: Callable[[list[KVChunk]], None]
    ) -> None:
        try:
            if lease.active:
                await self.pipeline.retrieve(keys, sizes, sink)
        finally:
            lease.ready.set()

    async def evict(
        self, tokens: object, *, tiers: Sequence[str] | None = None, domain: str | None = None
    ) -> dict[str, int]:
        """Drop the chunks of ``tokens`` from every tier (or the named ones); chunks dropped per tier.

        That includes the partial chunks this cache stored that ``tokens`` extend (what a lookup
        of ``tokens`` could find).
        """
        self._check_open()
        array = canonical_tokens(tokens)
        keys = self.keymaker.in_domain(domain).keys_of_canonical(array)
        full = array.size // self.config.chunk_size
        for position in range(full + 1):
            keys += [key for key, _ in self._partials_at(array, keys[:full], position, domain) if key not in keys]
        return await self.pipeline.evict(keys, None if tiers is None else set(tiers)) if keys else {}

    async def push(self, tokens: object, *, destination: str, transfer_id: str, timeout: float) -> int:  # noqa: ASYNC109
        """Send the KV of the leading cached chunks of ``tokens`` to another instance: how many
        leading tokens it holds afterwards (0 when nothing went).

        The keys are those a lookup of ``tokens`` there tries first: every whole chunk and the
        trailing partial chunk as it stands (store ``tokens`` itself first, so that chunk exists
        here). Goes through the first tier that declares :attr:`Capability.PUSH` (``lmplug-pd``'s
        ``pd`` tier), within ``timeout`` seconds; :class:`~lmplug.errors.ConfigError` when the
        cache has none.
        """
        self._check_open()
        keys, sizes = self._candidates(canonical_tokens(tokens), None)
        if not keys:
            return 0
        pushed = await self.pipeline.push(keys, destination, transfer_id, timeout)
        return sum(sizes[:pushed])

    async def transfer_state(self, transfer_id: str) -> str | None:
        """How a transfer another instance pushes here stands: ``receiving``, ``completed``,
        ``failed`` (the chunks verified before it ended are held), ``rejected``, or None (not
        opened here, or no tier receives pushes). From the first :attr:`Capability.PUSH` tier."""
        self._check_open()
        return await self.pipeline.transfer_state(transfer_id)

    async def drain(self) -> None:
        """Wait until every write-behind tier has finished the writes accepted so far."""
        self._check_open()
        for slot in self.pipeline.slots:
            await slot.tier.drain()

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(self._tier_statistics(), self.allocator.statistics(), len(self._leases))

    def _tier_statistics(self) -> tuple[TierStatistics, ...]:
        return tuple(slot.tier.statistics() for slot in self.pipeline.slots)

    # ------------------------------------------------------------------ callbacks

    def _lease_expired(self, lease: Lease) -> None:
        self.metrics.counts.expired_leases += 1
        logger.info("lease %d over %d tokens expired and was released", lease.lease_id, lease.num_tokens)

    def _report_tier_failure(self, tier: str, operation: str, exc: BaseException) -> None:
        self.metrics.tier_errors[tier, operation] += 1
        self._warnings.report(
            (tier, operation, type(exc)),
            "tier %r failed to %s and was skipped: %s: %s",
            tier, operation, type(exc).__name__, exc,
        )  # fmt: skip


def open_cache(
    config: ConfigSource = None,
    *,
    plugins: PluginHost | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cache:
    """A cache over ``config`` (a YAML path, a dict, an :class:`LmplugConfig`, or ``None`` for
    ``$LMPLUG_CONFIG``), to be entered with ``async with``.

    ``plugins`` replaces the entry-point plugin host (tests build one and register plugins
    on it); ``environ`` replaces ``os.environ`` for ``LMPLUG_*`` overrides and switches.
    """
    return Cache(config, plugins=plugins, environ=environ)


class _HookHoldings:
    """What the tiers admit and drop, passed on to the ``lmplug_chunks_*`` hooks of the cache's plugins."""

    def __init__(self, plugins: PluginHost) -> None:
        self.plugins = plugins

    def admitted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        try:
            self.plugins.pm.hook.lmplug_chunks_admitted(tier=tier, keys=keys)
        except Exception:
            logger.exception("an lmplug_chunks_admitted listener failed")

    def evicted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        try:
            self.plugins.pm.hook.lmplug_chunks_evicted(tier=tier, keys=keys)
        except Exception:
            logger.exception("an lmplug_chunks_evicted listener failed")
