"""The ``p2p`` tier: KV that other instances computed, fetched from their host memory.

One instance's view of the fleet. The tier

- serves its own instance's chunks to peers: a transfer server (:mod:`lmplug_p2p.transfer`)
  answers GET and EXISTS from the cache's *local* tiers (``TierContext.local_tiers()``: no
  peer or shared tier, so two instances never fetch from each other in a loop);
- tells the controller what those tiers hold: it registers with a snapshot of their keys,
  then follows what they admit and drop (``TierContext.watch``), batched by the controller
  client (:mod:`lmplug_controller.client`), which also re-registers after the controller
  restarts;
- on a lookup, asks the controller which peers hold the longest run of the prompt's keys,
  and on a retrieve fetches that run from the best of them (then the next), verified chunk
  by chunk; the pipeline promotes what arrives into the tiers above (host memory).

Whatever fails (controller down or slow, peer gone, bytes that do not verify, a time-out) is a
shorter hit or a miss, logged once in a while, never an error to the engine and never wrong
KV. The tier stores nothing itself: ``lmplug_store`` and ``lmplug_evict`` do nothing, and a
promotion into it admits nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from lmplug.tierkit import (
    Capability,
    ChunkKey,
    KVChunk,
    LocalTiers,
    Tier,
    TierContext,
    TierStatistics,
    hookimpl,
)
from lmplug_controller.client import ControllerClient, Holder, TierInfo
from lmplug_p2p.options import P2PTierConfig
from lmplug_p2p.transfer import Transport, TransportSettings, open_transport

logger = logging.getLogger("lmplug.p2p")

_ANSWER_REUSE = 1.0
"""Seconds a controller's answer about some keys serves again (a lookup's, for the retrieve that
follows it); a peer that dropped the chunks since serves fewer, which is a shorter hit."""
_PIN_SECONDS = 300.0
"""How long a controller's ``pin`` holds chunks when it gives no ``ttl_s``."""
_LOCAL_WAIT = 10.0
"""Seconds a registration waits for the cache to finish building its pipeline (it starts while the
tiers open, and lists the local tiers' keys once they are bound)."""


class P2PTier(Tier):
    """Fetches chunks from peers found through the controller; serves its own instance's chunks."""

    capabilities = frozenset({Capability.PEER})

    def __init__(self, context: TierContext, options: P2PTierConfig) -> None:
        super().__init__(context)
        self.options = options
        settings = TransportSettings(fingerprint=context.fingerprint, layout=context.layout, token=options.token())
        if context.plugins is not None:  # a transport any plugin registered (lmplug_register_transports)
            self.transport: Transport = context.plugins.resolve_transport(options.transport).factory(settings)
        else:
            self.transport = open_transport(options.transport, settings)
        self.instance_id = options.name_of_instance()
        self._peers = self.transport.client()
        self._stack: contextlib.AsyncExitStack | None = None
        self._controller: ControllerClient | None = None
        self._local: LocalTiers | None = None
        self._last: tuple[float, tuple[ChunkKey, ...], list[Holder]] | None = None
        self._pins: dict[int, tuple[list[ChunkKey], list[KVChunk]]] = {}
        self._pin_ids = itertools.count(1)
        self._group: anyio.abc.TaskGroup | None = None
        self._hits = self._misses = self._fetched = self._served_requests = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> P2PTier:
        options = self.options
        async with contextlib.AsyncExitStack() as stack:
            server = self.transport.server(self._serve, self._serve_contains, host=options.host, port=options.port)
            await stack.enter_async_context(server)
            self._server = server
            endpoint = options.advertise or server.endpoint
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)
            stack.callback(self._unpin_all)
            self._group = group
            group.start_soon(self._link_to_controller, endpoint)
            stack.callback(self.context.watch(self))
            stack.push_async_callback(self._peers.aclose)
            self._stack = stack.pop_all()
        logger.info("p2p tier %r: instance %r serves peers at %s", self.name, self.instance_id, endpoint)
        return self

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Not shielded: the stack holds task groups, whose scopes must exit as they were entered.
            await stack.aclose()

    def _unpin_all(self) -> None:
        for _, chunks in self._pins.values():
            for chunk in chunks:
                chunk.release()
        self._pins.clear()

    async def _link_to_controller(self, endpoint: str) -> None:
        """Register with the controller once the cache's pipeline is built (the tier opens before it
        is), then keep the link: heartbeats, events, lookups, commands, re-registration."""
        local = await self._wait_for_local_tiers()
        if local is None:
            logger.error(
                "p2p tier %r: the cache's pipeline was not built in %g s; not registering", self.name, _LOCAL_WAIT
            )
            return
        options = self.options
        controller = ControllerClient(
            options.controller,
            instance_id=self.instance_id,
            fingerprint=self.context.fingerprint,
            rank=self.context.config.rank,
            tiers=[TierInfo(t.name, t.type, t.capacity_bytes or 0) for t in local.statistics()],
            endpoint=endpoint,
            snapshot=self._snapshot,
            on_command=self._command,
            token=options.token(),
            heartbeat_seconds=options.heartbeat,
            lookup_timeout=options.lookup_timeout,
            stats=self._usage,
        )
        self._controller = controller
        await controller.run()

    async def _wait_for_local_tiers(self) -> LocalTiers | None:
        """The local tiers once the cache binds them (right after every tier opened), or ``None``."""
        with anyio.move_on_after(_LOCAL_WAIT):
            while True:
                try:
                    return self._local_tiers()
                except RuntimeError:
                    await anyio.sleep(0.01)  # the cache signals nothing when it binds them
        return None

    def _local_tiers(self) -> LocalTiers:
        if self._local is None:
            self._local = self.context.local_tiers()
        return self._local

    def _usage(self) -> dict[str, Any]:
        """What heartbeats report (the controller's dashboard shows it)."""
        tiers = {
            t.name: {
                "type": t.type,
                "chunks": t.chunks,
                "used_bytes": t.used_bytes,
                "capacity_bytes": t.capacity_bytes,
                "hits": t.hits,
                "misses": t.misses,
            }
            for t in (*self._local_tiers().statistics(), self.statistics())
        }
        return {"tiers": tiers}

    # ------------------------------------------------------------------ what this instance holds

    def admitted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        if self._controller is not None and self._is_local(tier):
            self._controller.admitted(tier, keys)

    def evicted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        if self._controller is not None and self._is_local(tier):
            self._controller.evicted(tier, keys)

    def _is_local(self, tier: str) -> bool:
        try:
            return tier in self._local_tiers().names
        except RuntimeError:  # the pipeline is still being built: the snapshot will list it
            return False

    async def _snapshot(self) -> dict[str, list[bytes]]:
        held = await self._local_tiers().held_keys()
        return {tier: [bytes(key) for key in keys] for tier, keys in held.items()}

    async def _serve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        self._served_requests += 1
        return await self._local_tiers().retrieve(keys)

    async def _serve_contains(self, keys: Sequence[ChunkKey]) -> int:
        return await self._local_tiers().contains(keys)

    async def _command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """A controller's command (``args["keys"]`` are bytes), run on this instance's local tiers:

        - ``health``: the tiers' usage;
        - ``clear``: drop ``keys`` (or every chunk) from ``tiers`` (or all of them);
        - ``pin``: hold the chunks of ``keys`` (they are not evicted) for ``ttl_s`` seconds or until
          ``unpin`` with the ``pin_id`` returned (or with the same keys);
        - ``fetch``: fetch ``keys`` from the peer at ``endpoint`` into the local tiers (a move's
          first half; the controller then clears the source unless it copies).

        An unknown op or bad arguments raise: the controller answers the caller with the error.
        """
        local = self._local_tiers()
        keys = [ChunkKey(key) for key in args.get("keys") or ()]
        tiers = args.get("tiers") or None
        if op == "health":
            return {"instance_id": self.instance_id, "pins": len(self._pins), **self._usage()}
        if op == "clear":
            if not keys:
                held = await local.held_keys()
                keys = list(
                    dict.fromkeys(key for name, found in held.items() if not tiers or name in tiers for key in found)
                )
            return {"dropped": await local.evict(keys, tiers)}
        if op == "pin":
            return self._pin(keys, await local.retrieve(keys), float(args.get("ttl_s") or _PIN_SECONDS))
        if op == "unpin":
            return {"released": self._unpin(args.get("pin_id"), keys)}
        if op == "fetch":
            chunks = await self._fetch_from(str(args["endpoint"]), keys)
            try:
                await local.store(keys[: len(chunks)], chunks)
            finally:
                for chunk in chunks:
                    chunk.release()
            return {"fetched": len(chunks)}
        raise ValueError(f"unknown command {op!r}; commands: health, clear, pin, unpin, fetch")

    def _pin(self, keys: list[ChunkKey], chunks: list[KVChunk], seconds: float) -> dict[str, Any]:
        pin_id = next(self._pin_ids)
        self._pins[pin_id] = (keys[: len(chunks)], chunks)
        if self._group is not None:
            self._group.start_soon(self._expire_pin, pin_id, seconds)
        return {"pin_id": pin_id, "chunks": len(chunks), "tokens": sum(chunk.num_tokens for chunk in chunks)}

    async def _expire_pin(self, pin_id: int, seconds: float) -> None:
        await anyio.sleep(seconds)
        self._unpin(pin_id, [])

    def _unpin(self, pin_id: object, keys: Sequence[ChunkKey]) -> int:
        """Release the pin ``pin_id``, or every pin holding one of ``keys``; how many chunks."""
        wanted = set(keys)
        released = 0
        for found in list(self._pins):
            held, chunks = self._pins[found]
            if found == pin_id or wanted.intersection(held):
                del self._pins[found]
                for chunk in chunks:
                    chunk.release()
                released += len(chunks)
        return released

    # ------------------------------------------------------------------ the data path

    async def _holders(self, keys: Sequence[ChunkKey]) -> list[Holder]:
        """Peers holding a leading run of ``keys``, longest first (the answer to the lookup that just
        asked about the same keys is reused by the retrieve that follows it)."""
        last = self._last
        wanted = tuple(keys)
        now = time.monotonic()
        if last is not None and now - last[0] < _ANSWER_REUSE and last[1][: len(wanted)] == wanted:
            return last[2]
        if self._controller is None:
            return []
        holders = await self._controller.lookup(keys)
        self._last = (now, wanted, holders)
        return holders

    @hookimpl
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int:
        holders = await self._holders(keys)
        return min(holders[0].chunks, len(keys)) if holders else 0

    @hookimpl
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        holders = await self._holders(keys)
        self._last = None  # fetched once: the next lookup asks the controller again
        for holder in holders[: self.options.holders]:
            chunks = await self._fetch_from(holder.endpoint, keys[: min(holder.chunks, len(keys))])
            if chunks:
                self._hits += len(chunks)
                return chunks
        self._misses += 1
        return []

    async def _fetch_from(self, endpoint: str, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        allocator = self.context.allocator
        chunks = await self._peers.fetch(
            endpoint, keys, None, allocator, self.context.layout, timeout=self.options.fetch_timeout
        )
        self._fetched += len(chunks)
        return chunks

    @hookimpl
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        return None  # peers hold their own chunks; this instance's are advertised from its local tiers

    @hookimpl
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int:
        return 0

    @hookimpl
    async def lmplug_transfer(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk], source: str) -> int:
        return 0  # nothing is promoted into a peer tier (it is the last tier; this is for completeness)

    def statistics(self) -> TierStatistics:
        return TierStatistics(
            name=self.name,
            type=self.context.type,
            chunks=0,
            used_bytes=0,
            capacity_bytes=None,
            hits=self._hits,
            misses=self._misses,
        )

    def p2p_statistics(self) -> dict[str, Any]:
        """The controller client's and the transfer client's and server's counters."""
        controller = self._controller.statistics() if self._controller is not None else {}
        return {
            "instance_id": self.instance_id,
            "fetched_chunks": self._fetched,
            "served_requests": self._served_requests,
            "controller": controller,
            "client": self._peers.statistics(),
            "server": self._server.statistics() if self._stack is not None else None,
        }
