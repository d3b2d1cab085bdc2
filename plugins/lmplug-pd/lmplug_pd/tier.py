"""The ``pd`` tier: the KV transfer of prefill/decode disaggregation.

Every instance runs both sides:

- **decode side**: a :class:`~lmplug_pd.transfer.PushReceiver` listens from the moment the tier
  opens (``PDTier.endpoint`` is what prefill instances dial); each push it accepts is verified
  chunk by chunk and admitted into the cache's *local* tiers (``TierContext.local_tiers()``)
  as it arrives, and held there (not evicted) for ``hold`` seconds;
- **prefill side**: ``lmplug_push`` (``Cache.push``) reads the leading chunks it holds from the
  local tiers and sends them to a decode instance's receiver
  (:class:`~lmplug_pd.transfer.PushSender`).

The tier stores nothing of its own: ``lmplug_store`` does nothing. Its lookups answer for the
chunks its transfers hold, so what arrived is found even in a cache without a local tier that
took it; ``lmplug_evict`` stops holding them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import anyio

from lmplug.tierkit import Capability, ChunkKey, KVChunk, Tier, TierContext, TierStatistics, hookimpl
from lmplug_pd.options import PDTierConfig
from lmplug_pd.transfer import PushReceiver, PushSender, ReceiverSettings

logger = logging.getLogger("lmplug.pd")


class PDTier(Tier):
    """Pushes a prompt's chunks to a decode instance; receives the pushes of prefill instances."""

    capabilities = frozenset({Capability.PUSH})

    def __init__(self, context: TierContext, options: PDTierConfig) -> None:
        super().__init__(context)
        self.options = options
        token = options.token()
        self._sender = PushSender(
            context.fingerprint,
            context.layout,
            token=token,
            connect_timeout=options.connect_timeout,
            chunk_delay=options.debug_chunk_delay,
        )
        settings = ReceiverSettings(
            fingerprint=context.fingerprint,
            layout=context.layout,
            host=options.host,
            port=options.port,
            advertise=options.advertise,
            max_inflight=options.max_inflight,
            admit_timeout=options.admit_timeout,
            hold=options.hold,
            idle_timeout=options.idle_timeout,
            token=token,
        )
        self._receiver = PushReceiver(settings, lambda: context.allocator, context.local_tiers)
        self._stack: contextlib.AsyncExitStack | None = None
        self._hits = self._misses = 0

    @property
    def endpoint(self) -> str:
        """``host:port`` of this instance's receiver: what a prefill instance pushes to."""
        return self._receiver.endpoint

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> PDTier:
        async with contextlib.AsyncExitStack() as stack:
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)  # leaving stops the receiver (callbacks run first)
            await group.start(self._receiver.run)
            self._stack = stack.pop_all()
        logger.info("pd tier %r: receiving pushes at %s", self.name, self.endpoint)
        return self

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()  # the receiver ends its transfers and releases every hold

    # ------------------------------------------------------------------ the data path

    @hookimpl
    async def lmplug_transfer_state(self, transfer_id: str) -> str | None:
        return self._receiver.transfer_state(transfer_id)

    @hookimpl
    async def lmplug_push(self, keys: Sequence[ChunkKey], destination: str, transfer_id: str, timeout: float) -> int:  # noqa: ASYNC109 - the hook's contract
        chunks: list[KVChunk] = []
        try:
            with anyio.move_on_after(timeout) as scope:
                chunks = await self.context.local_tiers().retrieve(keys)
            if scope.cancelled_caught or not chunks:
                return 0
            left = max(scope.deadline - anyio.current_time(), 0.0)
            return await self._sender.push(destination, transfer_id, keys, chunks, timeout=left)
        finally:
            for chunk in chunks:
                chunk.release()

    @hookimpl
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int:
        return self._receiver.contains(keys)

    @hookimpl
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        chunks = self._receiver.retrieve(keys)
        if chunks:
            self._hits += 1
        else:
            self._misses += 1
        return chunks

    @hookimpl
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        return None  # the local tiers store; this tier only moves chunks between instances

    @hookimpl
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int:
        return self._receiver.evict(keys)

    @hookimpl
    async def lmplug_transfer(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk], source: str) -> int:
        return 0  # nothing is promoted into it

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> TierStatistics:
        return TierStatistics(
            name=self.name,
            type=self.context.type,
            chunks=self._receiver.held_chunks(),
            used_bytes=0,  # held chunks are the allocator's and the local tiers' memory
            capacity_bytes=None,
            hits=self._hits,
            misses=self._misses,
        )

    def pd_statistics(self) -> dict[str, Any]:
        """Both sides' counters: ``endpoint``, ``sent`` (pushes: ``transfers``, ``chunks``,
        ``bytes``, ``failed`` by cause) and ``received`` (``transfers`` accepted, ``completed``,
        ``rejected`` and ``failed`` by reason, ``chunks_admitted``, ``chunks_present`` (already
        held, not resent), ``bytes``, ``inflight_bytes``, ``holds``, ``held_chunks``)."""
        received = self._receiver.statistics()
        return {"endpoint": received.pop("endpoint"), "sent": self._sender.statistics(), "received": received}
