"""The CPU tier against a model under random store / lookup / retrieve / evict / lease sequences.

Never a wrong byte (every served KV equals the reference KV of its prefix), never more
than was stored, leased chunks stay, and the pool's books balance after every step and
return to zero at the end.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import lmplug
from lmplug.testing import make_config, reference_kv

CHUNK = 8
CAPACITY_CHUNKS = 10  # a chunk of 8 tokens takes 1 KiB, 4 KiB once aligned
SEGMENTS = [[(s * 101 + i * 7) % 9_000 for i in range(length)] for s, length in enumerate([5, 8, 11, 16, 3, 24])]
prompts = st.lists(st.integers(0, len(SEGMENTS) - 1), min_size=1, max_size=5).map(
    lambda picks: [token for index in picks for token in SEGMENTS[index]]
)


class CpuTierMachine(RuleBasedStateMachine):
    backend: ClassVar[str] = "asyncio"
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.config = make_config(
            [{"type": "cpu", "capacity": CAPACITY_CHUNKS * 4096, "eviction": "lru"}],
            chunk_size=CHUNK,
            save_partial_chunks=True,
        )
        self.cache = lmplug.SyncCache(self.config, backend=self.backend)  # type: ignore[arg-type]
        self.cache.open()
        self.stored_keys: set[bytes] = set()
        self.pinned: dict[int, list[bytes]] = {}

    def _covering(self, tokens: list[int], num_tokens: int) -> list[bytes]:
        """The keys of the chunks that hold ``tokens[:num_tokens]``: whole chunks, then perhaps a
        partial one (a partial chunk stored for a shorter prompt that these tokens extend)."""
        cache = self.cache.async_cache
        full, rest = divmod(num_tokens, CHUNK)
        keys: list[bytes] = list(cache.keymaker.keys(tokens[: full * CHUNK]))
        if rest:
            previous = keys[-1] if keys else b""
            keys.append(cache.keymaker.key_after(previous, np.asarray(tokens[full * CHUNK : num_tokens], dtype="<i4")))
        return keys

    def _possible(self, tokens: list[int], held: set[bytes] | None = None) -> int:
        """Tokens the cache could at most know: the chunks stored so far (or ``held``), contiguous
        from 0, and then the longest partial chunk among them that these tokens extend."""
        held = self.stored_keys if held is None else held
        count = 0
        while (count + 1) * CHUNK <= len(tokens) and self._covering(tokens, (count + 1) * CHUNK)[-1] in held:
            count += 1
        for extra in range(min(CHUNK - 1, len(tokens) - count * CHUNK), 0, -1):
            if self._covering(tokens, count * CHUNK + extra)[-1] in held:
                return count * CHUNK + extra
        return count * CHUNK

    @rule(tokens=prompts)
    def store(self, tokens: list[int]) -> None:
        pinned = {key for keys in self.pinned.values() for key in keys}
        stored = self.cache.store(tokens, reference_kv(tokens, self.config))
        keys = self.cache.async_cache.keys(tokens)
        self.stored_keys.update(keys[: -(-stored // CHUNK)])
        # Lower bounds: with room beside what leases pin, a store takes the whole prompt, and
        # what a store says is cached is found and served (a cache that never hits fails here).
        if len(keys) + len(pinned - set(keys)) <= CAPACITY_CHUNKS:
            assert stored == len(tokens)
        assert self.cache.lookup(tokens) >= stored
        kv, count = self.cache.retrieve(tokens)
        assert count >= stored
        assert torch.equal(kv, reference_kv(tokens, self.config)[:, :, :count])

    @rule(tokens=prompts)
    def lookup(self, tokens: list[int]) -> None:
        found = self.cache.lookup(tokens)
        assert found <= self._possible(tokens)

    @rule(tokens=prompts)
    def retrieve(self, tokens: list[int]) -> None:
        kv, count = self.cache.retrieve(tokens)
        assert count <= self._possible(tokens)
        assert torch.equal(kv, reference_kv(tokens, self.config)[:, :, :count])

    @rule(target=leases, tokens=prompts)
    def lease(self, tokens: list[int]) -> lmplug.Lease:
        lease = self.cache.lease(tokens, ttl=3600)
        self.pinned[lease.lease_id] = self._covering(tokens, lease.num_tokens)
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease: lmplug.Lease) -> None:
        self.cache.release(lease)
        self.pinned.pop(lease.lease_id)

    @rule(tokens=prompts)
    def evict(self, tokens: list[int]) -> None:
        self.cache.evict(tokens)
        pinned = {key for keys in self.pinned.values() for key in keys}
        # What a lookup of these tokens could find was dropped, unless a lease pins it.
        assert self.cache.lookup(tokens) <= self._possible(tokens, pinned)

    @invariant()
    def leased_chunks_stay(self) -> None:
        tier: Any = self.cache.async_cache.pipeline.slots[0].tier
        held = self.cache.run_sync(lambda: set(tier._index))
        for keys in self.pinned.values():
            assert set(keys) <= held

    @invariant()
    def books_balance(self) -> None:
        tier: Any = self.cache.async_cache.pipeline.slots[0].tier
        self.cache.run_sync(tier.pool.check)
        stats = self.cache.statistics()
        assert stats.allocator.used_bytes == stats.tiers[0].used_bytes
        assert stats.leases == len(self.pinned)

    def teardown(self) -> None:
        pool = self.cache.async_cache.pipeline.slots[0].tier.pool  # type: ignore[attr-defined]
        self.cache.close()
        pool.check()
        assert pool.used_bytes == 0


class TrioCpuTierMachine(CpuTierMachine):
    backend = "trio"


TestCpuTierModelAsyncio = CpuTierMachine.TestCase
TestCpuTierModelTrio = TrioCpuTierMachine.TestCase
TestCpuTierModelAsyncio.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestCpuTierModelTrio.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
