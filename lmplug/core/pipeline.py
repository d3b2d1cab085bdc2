"""The pipeline: the configured tiers in order, and how each data-path hook is dispatched.

pluggy's call loop is synchronous, so an ``async`` hookimpl returns a coroutine that
pluggy would treat as a result (never ``None``: ``firstresult`` and wrappers break). The
pipeline instead checks each tier against the hook contract once, at start-up
(:func:`bind_tier`), and awaits the bound methods directly on the hot path:

- contains: tiers in order; later tiers are asked about what earlier ones lack; only
  contiguous hits from the first key count;
- retrieve: **waterfall**: the first tier holding a chunk serves it; a hit below the
  first tier is promoted into every tier above it (``lmplug_transfer``); with a caller's
  buffer, the first tier writes straight into it when it can (``lmplug_retrieve_into``) and
  the chunks of the others are copied into it as each tier answers;
- store: **write-all**: every tier is offered every chunk, in order;
- evict: every tier (or the named ones) drops the keys.

A tier that raises is reported through ``report_failure`` and treated as a miss (retrieve,
contains) or a skipped write (store, transfer): the engine keeps serving.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from lmplug.core.keys import ChunkKey
from lmplug.core.layout import KVLayout
from lmplug.core.memory import ChunkAllocator, KVChunk
from lmplug.core.tier import Capability, Tier, TierStatistics
from lmplug.core.transfer import copy_from_chunks
from lmplug.errors import ConfigError, CorruptChunk, PluginContractError
from lmplug.hooks.specs import DATA_PATH_HOOKS, OPTIONAL_DATA_PATH_HOOKS, make_plugin_manager

logger = logging.getLogger("lmplug.pipeline")

TRANSFER_STATES = frozenset({None, "receiving", "completed", "failed", "rejected"})
"""What ``lmplug_transfer_state`` may answer."""

FailureReport = Callable[[str, str, BaseException], None]
"""Called with (tier name, operation, exception) for each tier call that failed and degraded."""


@dataclass(frozen=True, slots=True)
class TierSlot:
    """One tier's place in the pipeline: its object and its bound data-path hookimpls."""

    name: str
    tier: Tier
    contains: Callable[[Sequence[ChunkKey]], Awaitable[int]]
    retrieve: Callable[[Sequence[ChunkKey]], Awaitable[list[KVChunk]]]
    store: Callable[[Sequence[ChunkKey], Sequence[KVChunk]], Awaitable[None]]
    evict: Callable[[Sequence[ChunkKey]], Awaitable[int]]
    transfer: Callable[[Sequence[ChunkKey], Sequence[KVChunk], str], Awaitable[int]]
    retrieve_into: Callable[[Sequence[ChunkKey], torch.Tensor], Awaitable[int]] | None = None
    """Bound only for tiers that declare :attr:`Capability.RETRIEVE_INTO`."""
    held_keys: Callable[[], Awaitable[list[ChunkKey]]] | None = None
    """Bound only for tiers that declare :attr:`Capability.LISTS_KEYS`."""
    push: Callable[[Sequence[ChunkKey], str, str, float], Awaitable[int]] | None = None
    """Bound only for tiers that declare :attr:`Capability.PUSH`."""
    transfer_state: Callable[[str], Awaitable[str | None]] | None = None
    """Bound only for tiers that declare :attr:`Capability.PUSH`."""


def bind_tier(name: str, tier: Tier) -> TierSlot:
    """Check ``tier`` against the hook contract and bind its data-path hookimpls.

    pluggy checks the signatures on a plugin manager of the tier's own, thrown away after:
    the plugin host's manager never holds tier objects, so any number of caches can share
    one host, and its hooks never reach a tier's async methods.
    """
    what = f"tier {name!r} ({type(tier).__qualname__})"
    pm = make_plugin_manager()
    try:
        pm.register(tier, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginContractError(f"{what} breaks the hook contract: {exc}") from exc
    functions: dict[str, Any] = {}
    for hook_name in (*DATA_PATH_HOOKS, *OPTIONAL_DATA_PATH_HOOKS):
        impls = getattr(pm.hook, hook_name).get_hookimpls()
        impl = impls[0] if impls else None
        capability = OPTIONAL_DATA_PATH_HOOKS.get(hook_name)
        if capability is not None and (Capability[capability] in tier.capabilities) != (impl is not None):
            raise PluginContractError(
                f"{what} implements {hook_name} without declaring Capability.{capability}"
                if impl is not None
                else f"{what} declares Capability.{capability} but does not implement {hook_name}; "
                "mark the method with @lmplug.tierkit.hookimpl"
            )
        if impl is None:
            if capability is not None:
                continue
            raise PluginContractError(
                f"{what} does not implement {hook_name}; mark the method with @lmplug.tierkit.hookimpl"
            )
        if not inspect.iscoroutinefunction(impl.function):
            raise PluginContractError(f"{what}: {hook_name} must be an async method (async def)")
        functions[hook_name.removeprefix("lmplug_")] = impl.function
    return TierSlot(name=name, tier=tier, **functions)


class Pipeline:
    """The configured tiers, in order, with the dispatch semantics of the data-path hooks."""

    def __init__(
        self,
        slots: Sequence[TierSlot],
        layout: KVLayout,
        report_failure: FailureReport,
        allocator: ChunkAllocator,
        chunk_size: int,
    ) -> None:
        self.slots = tuple(slots)
        self.layout = layout
        self.chunk_size = chunk_size
        self.allocator = allocator
        """Where chunks are allocated: the first tier's pool when it provides one, else the heap."""
        self._report_failure_to = report_failure

    def _report_failure(self, slot: TierSlot, operation: str, exc: BaseException) -> None:
        self._report_failure_to(slot.name, operation, exc)

    async def _waterfall(self, total: int, serve: Callable[[int, TierSlot, int], Awaitable[int]]) -> int:
        """Ask the tiers in order to serve keys from the first one not yet served, until all
        ``total`` are or no tier serves more; how many were served (the walk of every read).

        ``serve(index, slot, position)`` asks the tier at ``index`` for the keys from
        ``position`` on and says how many leading ones it served. The walk takes several
        passes: a tier may hold later keys but miss an earlier one that a tier below holds;
        once that one is served, the tiers above are asked again for what follows.
        """
        position = 0
        progress = True
        while progress and position < total:
            progress = False
            for index, slot in enumerate(self.slots):
                if position >= total:
                    break
                served = await serve(index, slot, position)
                if served:
                    position += served
                    progress = True
        return position

    async def contains(self, keys: Sequence[ChunkKey]) -> int:
        """Leading keys held by the pipeline as a whole: the walk of :meth:`_waterfall`, written
        out because every lookup takes it (the shared walk's extra coroutine frame per tier cost
        a fifth of a one-chunk lookup, ~1 us of 5, in the ``fixed_cost`` benchmark)."""
        total = len(keys)
        position = 0
        progress = True
        while progress and position < total:
            progress = False
            for slot in self.slots:
                try:
                    found = await slot.contains(keys[position:] if position else keys)
                except Exception as exc:
                    self._report_failure(slot, "contains", exc)
                    continue
                if found > 0:
                    position += min(found, total - position)
                    progress = True
                    if position >= total:
                        break
        return position

    async def held_by_all(self, keys: Sequence[ChunkKey]) -> int:
        """Leading keys that every tier without :attr:`Capability.WRITE_BEHIND` already holds
        (what a store can skip).

        Write-behind tiers are not asked: their ``contains`` may be slow (a remote EXISTS)
        and a store is on the engine's critical path, while their queued writes skip what
        they hold already, off that path. A stack of write-behind tiers only skips nothing: 0.
        """
        asked = [slot for slot in self.slots if Capability.WRITE_BEHIND not in slot.tier.capabilities]
        if not asked:
            return 0
        held = len(keys)
        for slot in asked:
            try:
                held = min(held, await slot.contains(keys[:held]))
            except Exception as exc:
                self._report_failure(slot, "contains", exc)
                return 0
            if held == 0:
                break
        return held

    async def retrieve(
        self,
        keys: Sequence[ChunkKey],
        token_counts: Sequence[int] | None,
        sink: Callable[[list[KVChunk]], None] | None = None,
    ) -> list[KVChunk]:
        """Chunks for the leading keys, each with one reference for the caller (waterfall + promotion).

        ``token_counts`` are the tokens each key's chunk must hold; ``None`` when the caller
        knows only the keys (a peer's request): each chunk is then checked against its own
        count, at most ``chunk_size`` tokens.

        With ``sink``, each tier's chunks are handed to it (references and all) as soon as they
        are checked, before they are promoted, and the call returns ``[]``: a caller that is
        cancelled part-way keeps what arrived (a lease that grows), and nothing leaks.
        """
        served: list[KVChunk] = []

        async def take(index: int, slot: TierSlot, position: int) -> int:
            chunks = await self._take_from(index, slot, keys, token_counts, position, sink)
            if sink is None:
                served.extend(chunks)
            return len(chunks)

        await self._waterfall(len(keys), take)
        return served

    async def take_resident(
        self, keys: Sequence[ChunkKey], token_counts: Sequence[int], sink: Callable[[list[KVChunk]], None]
    ) -> int:
        """Hand ``sink`` the leading chunks of ``keys`` that the first tier holds when that tier is host
        memory (it provides the allocator: no I/O); how many. Nothing is promoted, no other tier is asked."""
        if not self.slots or Capability.PROVIDES_ALLOCATOR not in self.slots[0].tier.capabilities:
            return 0
        return len(await self._take_from(0, self.slots[0], keys, token_counts, 0, sink))

    async def retrieve_into(self, keys: Sequence[ChunkKey], token_counts: Sequence[int], out: torch.Tensor) -> int:
        """Write the KV of the leading keys into ``out`` (which covers their tokens); how many tokens.

        The waterfall of :meth:`retrieve`, but the first tier writes into ``out`` itself when it
        declares :attr:`Capability.RETRIEVE_INTO`, and other tiers' chunks are copied into
        ``out`` as each tier answers (then promoted, then released).
        """
        filled = 0  # tokens written into out
        copied: list[KVChunk] = []  # released once the copies out of them are done

        async def write(index: int, slot: TierSlot, position: int) -> int:
            nonlocal filled
            target = out.narrow(2, filled, out.shape[2] - filled) if filled else out
            into = slot.retrieve_into if index == 0 else None  # tiers below are promoted from: chunks
            if into is not None:
                served = await self._retrieve_into(slot, into, keys[position:] if position else keys, target)
                filled += sum(token_counts[position : position + served])
                return served
            chunks = await self._take_from(index, slot, keys, token_counts, position)
            copied.extend(chunks)
            filled += copy_from_chunks(chunks, target)
            return len(chunks)

        try:
            await self._waterfall(len(keys), write)
        finally:
            if copied:
                if out.is_cuda:
                    torch.cuda.current_stream(out.device).synchronize()  # the copies read the chunks
                for chunk in copied:
                    chunk.release()
        return filled

    async def _take_from(
        self,
        index: int,
        slot: TierSlot,
        keys: Sequence[ChunkKey],
        token_counts: Sequence[int] | None,
        position: int,
        sink: Callable[[list[KVChunk]], None] | None = None,
    ) -> list[KVChunk]:
        """``keys[position:]`` from the tier at ``index``: its valid leading chunks, promoted into the tiers above.

        With ``sink``, the chunks go to it (with their references) before the promotion, which
        only reads them; the list returned then holds no references of its own.
        """
        wanted = keys[position:] if position else keys
        try:
            chunks = await slot.retrieve(wanted)
        except Exception as exc:
            self._report_failure(slot, "retrieve", exc)
            return []
        chunks = self._valid_prefix(slot, chunks, token_counts, position, len(keys))
        if not chunks:
            return chunks
        if sink is None:
            if index:
                await self._promote(index, slot.name, wanted[: len(chunks)], chunks)
            return chunks
        # The sink's owner may let go of the chunks while they are promoted: keep them alive until then.
        reading = [chunk.acquire() for chunk in chunks]
        try:
            sink(chunks)
            if index:
                await self._promote(index, slot.name, wanted[: len(chunks)], reading)
        finally:
            for chunk in reading:
                chunk.release()
        return chunks

    async def _retrieve_into(
        self,
        slot: TierSlot,
        into: Callable[[Sequence[ChunkKey], torch.Tensor], Awaitable[int]],
        keys: Sequence[ChunkKey],
        out: torch.Tensor,
    ) -> int:
        try:
            served = await into(keys, out)
        except Exception as exc:
            self._report_failure(slot, "retrieve", exc)
            return 0
        if not isinstance(served, int) or not 0 <= served <= len(keys):
            self._report_failure(
                slot,
                "retrieve",
                PluginContractError(
                    f"lmplug_retrieve_into answered {served!r} for {len(keys)} keys; treated as a miss"
                ),
            )
            return 0
        return served

    def _valid_prefix(
        self, slot: TierSlot, chunks: list[KVChunk], token_counts: Sequence[int] | None, position: int, total: int
    ) -> list[KVChunk]:
        """Keep the leading chunks whose layout matches the keys they answer; release the rest."""
        layout = self.layout
        limit = total - position
        for offset, chunk in enumerate(chunks):
            if offset >= limit:
                expected = -1
            elif token_counts is None:
                expected = chunk.num_tokens if 0 < chunk.num_tokens <= self.chunk_size else 0
            else:
                expected = token_counts[position + offset]
            tensor = chunk.tensor
            if expected < 0 or tensor.dtype != layout.dtype or tuple(tensor.shape) != layout.shape(expected):
                if expected >= 0:
                    self._report_failure(
                        slot,
                        "retrieve",
                        CorruptChunk(
                            f"tier {slot.name!r} returned KV of shape {list(tensor.shape)} {tensor.dtype} "
                            f"for a chunk of {expected} tokens; dropped"
                        ),
                    )
                for extra in chunks[offset:]:
                    extra.release()
                return chunks[:offset]
        return chunks

    async def _promote(self, below: int, source: str, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        for slot in self.slots[:below]:
            try:
                await slot.transfer(keys, chunks, source)
            except Exception as exc:
                self._report_failure(slot, "transfer", exc)

    async def store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        """Offer chunks to every tier, in order (write-all)."""
        for slot in self.slots:
            try:
                await slot.store(keys, chunks)
            except Exception as exc:
                self._report_failure(slot, "store", exc)

    async def evict(self, keys: Sequence[ChunkKey], tiers: Collection[str] | None = None) -> dict[str, int]:
        """Drop keys from every tier (or the named ones); how many each dropped."""
        dropped: dict[str, int] = {}
        for slot in self.slots:
            if tiers is not None and slot.name not in tiers:
                continue
            try:
                dropped[slot.name] = await slot.evict(keys)
            except Exception as exc:
                self._report_failure(slot, "evict", exc)
                dropped[slot.name] = 0
        return dropped

    async def push(self, keys: Sequence[ChunkKey], destination: str, transfer_id: str, timeout: float) -> int:  # noqa: ASYNC109
        """Push ``keys`` through the first tier that declares :attr:`Capability.PUSH`: how many
        leading chunks the destination holds. A tier that fails is reported and counts as 0."""
        for slot in self.slots:
            if slot.push is None:
                continue
            try:
                pushed = await slot.push(keys, destination, transfer_id, timeout)
            except Exception as exc:
                self._report_failure(slot, "push", exc)
                return 0
            if not isinstance(pushed, int) or isinstance(pushed, bool) or not 0 <= pushed <= len(keys):
                self._report_failure(
                    slot, "push", PluginContractError(f"lmplug_push answered {pushed!r} for {len(keys)} keys")
                )
                return 0
            return pushed
        raise ConfigError("no tier of this cache can push chunks (a tier declaring Capability.PUSH, e.g. 'pd')")

    async def transfer_state(self, transfer_id: str) -> str | None:
        """The first :attr:`Capability.PUSH` tier's word on a transfer pushed to this instance
        (None: no such tier, unknown, or the tier failed, which is reported)."""
        for slot in self.slots:
            if slot.transfer_state is None:
                continue
            try:
                state = await slot.transfer_state(transfer_id)
            except Exception as exc:
                self._report_failure(slot, "transfer_state", exc)
                return None
            if state not in TRANSFER_STATES:
                self._report_failure(
                    slot, "transfer_state", PluginContractError(f"lmplug_transfer_state answered {state!r}")
                )
                return None
            return state
        return None

    def local_tiers(self, exclude: Tier) -> LocalView:
        """The tiers that hold chunks in this instance (not :attr:`Capability.PEER` nor
        :attr:`Capability.SHARED`), ``exclude`` left out: what a peer tier serves to others."""
        kept = [
            slot
            for slot in self.slots
            if slot.tier is not exclude and not {Capability.PEER, Capability.SHARED} & slot.tier.capabilities
        ]
        return LocalView(Pipeline(kept, self.layout, self._report_failure_to, self.allocator, self.chunk_size))


class LocalView:
    """:class:`lmplug.tierkit.LocalTiers` over a pipeline of some of a cache's tiers."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.names = tuple(slot.name for slot in pipeline.slots)

    async def contains(self, keys: Sequence[ChunkKey]) -> int:
        return await self.pipeline.contains(keys)

    async def retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        return await self.pipeline.retrieve(keys, None)

    async def store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        await self.pipeline.store(keys, chunks)

    async def evict(self, keys: Sequence[ChunkKey], tiers: Collection[str] | None = None) -> dict[str, int]:
        return await self.pipeline.evict(keys, tiers)

    def statistics(self) -> tuple[TierStatistics, ...]:
        return tuple(slot.tier.statistics() for slot in self.pipeline.slots)

    async def held_keys(self) -> dict[str, list[ChunkKey]]:
        held: dict[str, list[ChunkKey]] = {}
        for slot in self.pipeline.slots:
            if slot.held_keys is None:
                continue
            try:
                held[slot.name] = list(await slot.held_keys())
            except Exception as exc:
                self.pipeline._report_failure(slot, "held_keys", exc)
        return held
