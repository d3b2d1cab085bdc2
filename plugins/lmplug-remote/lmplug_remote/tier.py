"""The L4 shared tier: chunks in a remote store that several engines read and write.

The connector (chosen by the URL's scheme) moves blobs; this tier frames each chunk as the
core serde header plus the codec's bytes, verifies everything it reads back, writes behind
through a bounded queue, bounds every call with a time-out and wraps the store in a
circuit breaker, so that a dead or slow store costs a miss, never a stalled engine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import torch
from pydantic import Field, PositiveInt, ValidationError, ValidationInfo, model_validator

from lmplug import ConfigError, CorruptChunk, PluginUnavailable, TierUnavailable
from lmplug.tierkit import (
    HEADER,
    Batch,
    Capability,
    ChunkCodec,
    ChunkHeader,
    ChunkKey,
    Duration,
    KVBytes,
    KVChunk,
    RawCodec,
    RemoteConnector,
    StrictModel,
    TierContext,
    TierStatistics,
    WriteBehindTier,
    config_error,
    hookimpl,
    parts_checksum,
    payload_checksum,
    slice_parts,
)
from lmplug_remote.breaker import BreakerState, CircuitBreaker

logger = logging.getLogger("lmplug.remote")
_INLINE_BYTES = 4 * 2**20
_WRITE_BATCH = 8
T = TypeVar("T")


class BreakerConfig(StrictModel):
    """When to stop asking a failing store, and when to try it again."""

    failures: PositiveInt = Field(default=3, description="Consecutive failed calls that open the breaker.")
    cooldown: Duration = Field(default=1.0, gt=0, description="Wait before the first probe; doubles per failed probe.")
    max_cooldown: Duration = Field(default=30.0, gt=0, description="Longest wait between probes.")


class RemoteTierConfig(StrictModel):
    """Options of a ``type: remote`` tier."""

    url: str = Field(min_length=1, description="Store URL; its scheme picks the connector (redis://, s3://, lm://).")
    connector: dict[str, Any] = Field(
        default_factory=dict, description="Options of the scheme's connector (see the connector tables)."
    )
    codec: str = Field(default="raw", min_length=1, description="How chunks are stored: raw, lz4, zstd, int8, fp8.")
    timeout: Duration = Field(default=2.0, gt=0, description="Limit of one lookup, read or delete.")
    write_timeout: Duration = Field(default=10.0, gt=0, description="Limit of one chunk write.")
    ttl: Duration | None = Field(default=None, gt=0, description="Entries expire after this long (where supported).")
    write_queue: PositiveInt = Field(default=256, description="Chunks waiting to be written; more are skipped.")
    writers: PositiveInt = Field(default=4, description="Chunks written at once.")
    readers: PositiveInt = Field(default=8, description="Chunks read at once.")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="Circuit breaker settings.")

    @model_validator(mode="after")
    def _check_with_plugins(self, info: ValidationInfo) -> RemoteTierConfig:
        """With the cache's plugins at hand (``lmplug config check``, start-up), the URL's scheme
        and the codec must be served and the connector options must be valid for that scheme."""
        plugins = (info.context or {}).get("plugins")
        if plugins is None:
            return self
        scheme_name = urlsplit(self.url).scheme.lower()
        if not scheme_name:
            raise ValueError(f"url {self.url!r} has no scheme (e.g. redis://host:6379)")
        scheme = plugins.resolve_remote_scheme(scheme_name)  # PluginUnavailable names the schemes there are
        plugins.resolve_codec(self.codec)
        try:
            scheme.config_model.model_validate(self.connector)
        except ValidationError as exc:
            problems = "; ".join(
                f"connector.{'.'.join(str(part) for part in error['loc'])}: "
                f"{'unknown key' if error['type'] == 'extra_forbidden' else error['msg']}"
                for error in exc.errors(include_url=False)
            )
            raise ValueError(f"invalid options of the {scheme_name}:// connector: {problems}") from None
        return self


class RemoteTier(WriteBehindTier):
    """A remote store reached through a connector plugin; see the module docstring."""

    capabilities = frozenset(
        {Capability.SHARED, Capability.PERSISTENT, Capability.WRITE_BEHIND, Capability.RETRIEVE_INTO}
    )

    def __init__(self, context: TierContext, options: RemoteTierConfig) -> None:
        super().__init__(
            context, logger=logger, queue_size=options.write_queue, writers=options.writers, batch=_WRITE_BATCH
        )
        self.options = options
        plugins = context.plugins
        if plugins is None:
            raise PluginUnavailable(f"tier {context.name!r}: built without the cache's plugins (remote schemes)")
        scheme_name = urlsplit(options.url).scheme.lower()
        if not scheme_name:
            raise ConfigError(f"tier {context.name!r}: url {options.url!r} has no scheme (e.g. redis://host:6379)")
        scheme = plugins.resolve_remote_scheme(scheme_name)
        try:
            connector_options = scheme.config_model.model_validate(options.connector)
        except ValidationError as exc:
            raise config_error(exc, prefix=f"tier {context.name!r}: connector") from None
        self.codec: ChunkCodec = plugins.resolve_codec(options.codec)
        self.codec.prepare()
        self.connector: RemoteConnector = scheme.factory(options.url, connector_options)
        self.breaker = CircuitBreaker(options.breaker.failures, options.breaker.cooldown, options.breaker.max_cooldown)
        self._raw = isinstance(self.codec, RawCodec)
        self._prefix = f"lmplug/{self.codec.name}/"
        self._chunk_size = context.config.chunk_size
        full_shape = context.layout.shape(self._chunk_size)
        self._max_stored = self.codec.max_encoded_size(torch.Size(full_shape), context.layout.dtype)
        self._read_limiter = anyio.CapacityLimiter(options.readers)
        self._cpu_limiter = anyio.CapacityLimiter(max(options.readers, options.writers))
        self._skipped = self._refused = self._corrupt = self._bytes_written = 0

    def key_name(self, key: ChunkKey) -> str:
        """The store key of a chunk: the codec's name (a reader with another codec misses), then the key."""
        return self._prefix + key.hex()

    # ------------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        try:
            await self.connector.connect()
        except TierUnavailable as exc:
            # Serving without the store is better than not serving: the breaker retries it.
            self.breaker.failed()
            self._report("connect", f"cannot reach {self.options.url} ({exc}); serving misses until it answers")

    async def _release(self) -> None:
        await self.connector.aclose()

    async def __aenter__(self) -> RemoteTier:
        await super().__aenter__()
        logger.info("remote tier %r: %s, codec %s", self.name, self.options.url, self.codec.name)
        return self

    # ------------------------------------------------------------------ calls to the store

    async def _ask_store(self, operation: str, limit: float, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One call to the store, bounded by ``limit`` seconds and guarded by the breaker; a failure
        is counted, reported and raised as :class:`TierUnavailable`."""
        if not self.breaker.allow():
            self._refused += 1
            raise TierUnavailable(
                f"tier {self.name!r}: {self.options.url} is failing; not asked again for {self.breaker.retry_in:.1f} s"
            )
        try:
            with anyio.fail_after(limit):
                result = await function(*args)
        except CorruptChunk:
            self.breaker.succeeded()  # the store answered; what it holds is bad
            raise
        except Exception as exc:
            self._errors += 1
            reason = f"timed out after {limit:g} s" if isinstance(exc, TimeoutError) else str(exc)
            if self.breaker.failed():
                logger.warning(
                    "remote tier %r: %s failing (%s: %s); serving misses, next try in %.1f s",
                    self.name, self.options.url, operation, reason, self.breaker.cooldown,
                )  # fmt: skip
            else:
                self._report(operation, f"{operation} failed: {reason}")
            raise TierUnavailable(f"tier {self.name!r}: {operation} on {self.options.url}: {reason}") from exc
        except BaseException:
            self.breaker.abandoned()  # cancelled before the call settled
            raise
        if self.breaker.succeeded():
            logger.warning("remote tier %r: %s answers again", self.name, self.options.url)
        return result

    async def _read_entry(self, key: ChunkKey, read: Callable[[], Awaitable[T | None]]) -> T | None:
        """``read()``, where bad data is dropped from the store and an unavailable store is a miss: ``None``."""
        try:
            return await read()
        except CorruptChunk as exc:
            await self._drop(key, exc)
        except TierUnavailable:
            pass
        return None

    # ------------------------------------------------------------------ data path

    @hookimpl
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int:
        ask = [key for key in keys if not self.queued(key)]
        present: set[ChunkKey] = set()
        if ask:
            try:
                answers = await self._ask_store("exists", self.options.timeout, self.connector.exists, self._names(ask))
            except TierUnavailable:
                answers = [False] * len(ask)
            present = {key for key, there in zip(ask, answers, strict=True) if there}
        found = 0
        for key in keys:
            if key not in present and not self.queued(key):
                break
            found += 1
        return found

    def _names(self, keys: Sequence[ChunkKey]) -> list[str]:
        prefix = self._prefix
        return [prefix + key.hex() for key in keys]

    @hookimpl
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        chunks: list[KVChunk] = []
        start = 0
        while start < len(keys) and self.queued(keys[start]):
            chunks.append(self._queue.pending[keys[start]].acquire())  # still queued for writing: from memory
            start += 1
        if start < len(keys):
            chunks += await self._fetch(keys[start:])
        self._count(len(chunks), len(keys))
        return chunks

    async def _fetch(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        """Read the chunks in parallel (up to ``readers``); the leading ones that came back whole."""
        results = await self._fetch_prefix(len(keys), lambda index: self._get(keys[index]))
        good = next((i for i, chunk in enumerate(results) if chunk is None), len(results))
        for chunk in results[good:]:
            if chunk is not None:
                chunk.release()
        return [chunk for chunk in results[:good] if chunk is not None]

    async def _fetch_prefix(self, count: int, get: Callable[[int], Awaitable[T | None]]) -> list[T | None]:
        """``get(i)`` for ``i < count`` in parallel (up to ``readers``); a key after one that missed is not asked."""
        results: list[T | None] = [None] * count
        done = [False] * count

        async def fetch(index: int) -> None:
            async with self._read_limiter:
                if index and any(results[i] is None and done[i] for i in range(index)):
                    return  # an earlier key missed: this one cannot be used
                try:
                    results[index] = await get(index)
                finally:
                    done[index] = True

        async with anyio.create_task_group() as group:
            for index in range(count):
                group.start_soon(fetch, index)
        return results

    @hookimpl
    async def lmplug_retrieve_into(self, keys: Sequence[ChunkKey], out: torch.Tensor) -> int:
        """Raw entries are received straight into ``out`` (its per-layer rows as the read's
        buffers) and verified there; other codecs, and a CUDA ``out``, go through chunks."""
        rows = KVBytes.of(out) if self._raw else None
        if rows is None:
            return await self.retrieve_by_copy(keys, out)
        size = self._chunk_size
        total = int(out.shape[2])
        count = min(len(keys), -(-total // size))
        served = self._queue.copy_queued(keys[:count], out, size)  # still queued for writing: from memory
        if served < count:
            first = served

            async def get(index: int) -> bool | None:
                start = (first + index) * size
                tokens = min(size, total - start)
                return await self._get_into(keys[first + index], rows.payload(start, tokens), tokens)

            results = await self._fetch_prefix(count - first, get)
            served += next((i for i, ok in enumerate(results) if not ok), len(results))
        self._count(served, len(keys))
        return served

    async def _get_into(self, key: ChunkKey, payload: list[memoryview], tokens: int) -> bool | None:
        """One raw entry received into ``payload`` and verified there; ``None`` on a miss, a failure or bad data."""
        header = bytearray(HEADER.size)

        async def read() -> bool | None:
            name = self.key_name(key)
            get = self.connector.get_into
            length = await self._ask_store("get", self.options.timeout, get, name, [memoryview(header), *payload])
            if length is None:
                return None
            await self._cpu_work(length, self._verify, key, header, payload, length, tokens)
            return True

        return await self._read_entry(key, read)

    async def _get(self, key: ChunkKey) -> KVChunk | None:
        """One chunk from the store, verified (and decoded); ``None`` on a miss, a failure or bad data."""
        allocator = self.context.allocator
        full: KVChunk | None = None
        if self._raw:  # received into a whole chunk, handed over as it is when it is one
            full = allocator.allocate(self._chunk_size)
            if full is None:
                return None
            body = full.raw()
        else:
            body = torch.empty(self._max_stored, dtype=torch.uint8).numpy().data.cast("B")  # no zero-fill
        header = bytearray(HEADER.size)

        async def read() -> KVChunk | None:
            nonlocal full
            name = self.key_name(key)
            parts = [memoryview(header), body]
            length = await self._ask_store("get", self.options.timeout, self.connector.get_into, name, parts)
            if length is None:
                return None
            described = await self._cpu_work(length, self._verify, key, header, [body], length)
            if full is not None and described.tokens == self._chunk_size:
                whole, full = full, None
                return whole
            chunk = allocator.allocate(described.tokens)
            if chunk is None:
                return None
            try:
                stored = body[: length - HEADER.size]
                await anyio.to_thread.run_sync(self._decode, stored, chunk, limiter=self._cpu_limiter)
            except BaseException:
                chunk.release()
                raise
            return chunk

        try:
            return await self._read_entry(key, read)
        finally:
            if full is not None:
                full.release()

    async def _cpu_work(self, nbytes: int, function: Callable[..., T], *args: Any) -> T:
        """Run CPU work in a worker thread, unless it is a raw chunk's checksum small enough
        (about 0.1 ms per 2 MiB) that two thread hand-offs would cost more than it does."""
        if self._raw and nbytes <= _INLINE_BYTES:
            return function(*args)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._cpu_limiter)

    def _verify(
        self, key: ChunkKey, header: bytearray, body: list[memoryview], length: int, tokens: int | None = None
    ) -> ChunkHeader:
        """Check a value read back: its header names this key and layout (and ``tokens`` when known),
        and its bytes (the first of ``body``'s, in order) match the checksum."""
        if length < HEADER.size:
            raise CorruptChunk(f"entry of {length} bytes is shorter than a chunk header")
        described = ChunkHeader.unpack(bytes(header))
        described.expect(key, self.context.layout, tokens)
        if not 0 < described.tokens <= self._chunk_size:
            raise CorruptChunk(f"entry holds {described.tokens} tokens; chunks hold at most {self._chunk_size}")
        stored = length - HEADER.size
        if self._raw and stored != described.nbytes:
            raise CorruptChunk(f"entry has {stored} payload bytes, its header says {described.nbytes}")
        if parts_checksum(slice_parts(body, 0, stored)) != described.checksum:
            raise CorruptChunk("entry payload checksum mismatch")
        return described

    def _decode(self, stored: memoryview, chunk: KVChunk) -> None:
        try:
            self.codec.decode(stored, chunk.tensor)
        except CorruptChunk:
            raise
        except Exception as exc:  # whatever a codec raises on bad bytes, the chunk is bad
            raise CorruptChunk(f"codec {self.codec.name!r} cannot decode the entry: {exc!r}") from exc

    async def _drop(self, key: ChunkKey, failure: CorruptChunk) -> None:
        """Bad data is deleted from the store (best effort) and never served."""
        self._corrupt += 1
        self._report("corrupt", f"dropped {self.key_name(key)}: {failure}")
        with contextlib.suppress(TierUnavailable):
            await self._ask_store("delete", self.options.timeout, self.connector.delete, [self.key_name(key)])

    @hookimpl
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        for key, chunk in zip(keys, chunks, strict=True):
            if self.breaker.state is BreakerState.OPEN and self.breaker.retry_in > 0:
                self._skipped += 1  # the store is down: do not queue work that will only fail
            else:
                self._queue.offer(key, chunk)  # a full queue skips it: the store is behind, the engine is not

    async def _write_batch(self, batch: Batch) -> None:
        """Write the chunks the store does not hold yet: one EXISTS round trip for the batch, then
        one ``put_many``; failures are counted and reported, never raised."""
        batch = [(key, chunk) for key, chunk in batch if not self._queue.cancelled(key)]
        if not batch:
            return
        try:
            held = await self._ask_store(
                "exists", self.options.timeout, self.connector.exists, self._names([key for key, _ in batch])
            )
        except TierUnavailable:
            return  # counted and reported by _ask_store
        # Another engine (or an earlier run) may have stored some already.
        todo = [(key, chunk) for (key, chunk), there in zip(batch, held, strict=True) if not there]
        if not todo:
            return
        encoded, failures = await self._cpu_work(sum(chunk.nbytes for _, chunk in todo), self._encode_all, todo)
        for exc in failures:  # a codec bug must not take the cache down: those chunks are skipped
            self._errors += 1
            self._report("encode", f"cannot encode a chunk with codec {self.codec.name!r}: {exc!r}")
        if not encoded:
            return
        entries = [(self.key_name(key), parts) for key, parts in encoded]
        limit = self.options.write_timeout * len(entries)
        try:
            await self._ask_store("put", limit, self.connector.put_many, entries, self.options.ttl)
        except TierUnavailable:
            return  # counted and reported by _ask_store
        undo = [name for (key, _), (name, _) in zip(encoded, entries, strict=True) if self._queue.cancelled(key)]
        if undo:  # evicted on command while they were being written
            with contextlib.suppress(TierUnavailable):
                await self._ask_store("delete", self.options.timeout, self.connector.delete, undo)
        self._stored += len(entries) - len(undo)
        self._bytes_written += sum(part.nbytes for _, parts in entries for part in parts)

    def _encode_all(self, todo: Batch) -> tuple[list[tuple[ChunkKey, list[memoryview]]], list[Exception]]:
        """Header and stored bytes of each chunk, and what the codec raised for those it could not encode."""
        encoded: list[tuple[ChunkKey, list[memoryview]]] = []
        failures: list[Exception] = []
        for key, chunk in todo:
            try:
                stored = chunk.raw() if self._raw else self.codec.encode(chunk.tensor)
            except Exception as exc:
                failures.append(exc)
                continue
            header = ChunkHeader.for_chunk(key, self.context.layout, chunk.num_tokens, payload_checksum(stored))
            encoded.append((key, [memoryview(header.pack()), stored]))
        return encoded, failures

    @hookimpl
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int:
        """Cancel queued writes and delete stored entries; only the keys that were held are reported."""
        dropped = [key for key in keys if self._queue.cancel(key)]
        cancelled = set(dropped)
        remote = [key for key in keys if key not in cancelled]
        if remote:
            with contextlib.suppress(TierUnavailable):
                timeout = self.options.timeout
                held = await self._ask_store("exists", timeout, self.connector.exists, self._names(remote))
                present = [key for key, there in zip(remote, held, strict=True) if there]
                if present:
                    await self._ask_store("delete", timeout, self.connector.delete, self._names(present))
                    dropped += present
        if dropped:
            self._evictions += len(dropped)
            self.context.report_evicted(dropped)
        return len(dropped)

    # ------------------------------------------------------------------ reporting

    def statistics(self) -> TierStatistics:
        return self._statistics(
            chunks=self._stored,
            used_bytes=self._bytes_written,
            capacity_bytes=None,
            errors=self._corrupt,
            skipped=self._skipped,
        )
