"""The blocking facade, used from plain threads as vLLM's connector would."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import lmplug
from lmplug.errors import CacheClosedError, KVShapeError
from lmplug.testing import make_config, reference_kv

CHUNK = 16


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_cache_round_trip(backend: Any) -> None:
    config = make_config(chunk_size=CHUNK)
    tokens = list(range(3 * CHUNK))
    kv = reference_kv(tokens, config)
    with lmplug.SyncCache(config, backend=backend) as cache:
        assert cache.lookup(tokens) == 0
        assert cache.store(tokens, kv) == 3 * CHUNK
        assert cache.lookup(tokens) == 3 * CHUNK
        out, count = cache.retrieve(tokens)
        assert count == 3 * CHUNK
        assert torch.equal(out, kv)
        lease = cache.lease(tokens, ttl=60)
        assert lease.num_tokens == 3 * CHUNK
        cache.release(lease)
        assert cache.statistics().leases == 0
        assert cache.evict(tokens) == {"cpu": 3}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_cache_shared_by_threads(backend: Any) -> None:
    config = make_config([{"type": "cpu", "capacity": "256KiB"}], chunk_size=CHUNK)
    errors: list[str] = []
    with lmplug.SyncCache(config, backend=backend) as cache:

        def worker(seed: int) -> None:
            for turn in range(20):
                tokens = [(seed * 1000 + turn % 5 * 37 + i) % 40_000 for i in range((1 + turn % 3) * CHUNK)]
                cache.store(tokens, reference_kv(tokens, config))
                found = cache.lookup(tokens)
                out, count = cache.retrieve(tokens)
                if (found, count) != (len(tokens), len(tokens)):  # 60 chunks at most: the pool holds 64
                    errors.append(f"thread {seed} turn {turn}: {found} found, {count} served of {len(tokens)}")
                elif not torch.equal(out, reference_kv(tokens, config)):
                    errors.append(f"thread {seed} turn {turn}: wrong KV")

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = cache.statistics()
    assert errors == []
    assert stats.allocator.used_bytes == stats.tiers[0].used_bytes


def test_errors_cross_the_portal() -> None:
    with lmplug.SyncCache(make_config()) as cache, pytest.raises(KVShapeError):
        cache.store([1, 2], torch.zeros(3))


def test_closed_sync_cache_refuses_calls() -> None:
    cache = lmplug.SyncCache(make_config())
    with pytest.raises(CacheClosedError):
        cache.lookup([1])
    with cache:
        pass
    cache.close()  # idempotent
    with pytest.raises(CacheClosedError):
        cache.lookup([1])


def test_a_bad_config_fails_on_open_and_leaves_no_thread() -> None:
    before = threading.active_count()
    with pytest.raises(lmplug.ConfigError), lmplug.SyncCache(make_config(chunk_size=0)):
        pass
    assert threading.active_count() == before
