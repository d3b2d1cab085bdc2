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
    before = set(threading.enumerate())  # threads of earlier tests may end meanwhile (a pool's prefault)
    with pytest.raises(lmplug.ConfigError), lmplug.SyncCache(make_config(chunk_size=0)):
        pass
    assert set(threading.enumerate()) - before == set()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_closing_while_threads_are_mid_call_ends_every_call_cleanly(backend: Any) -> None:
    """Threads storing, retrieving and leasing while another thread closes the cache: each call
    completes (with right KV) or raises CacheClosedError; no thread hangs, nothing else is raised."""
    config = make_config([{"type": "cpu", "capacity": "256KiB"}], chunk_size=CHUNK)
    cache = lmplug.SyncCache(config, backend=backend)
    cache.open()
    outcomes: list[str] = []
    served = threading.Semaphore(0)

    def worker(seed: int) -> None:
        turn = 0
        while True:
            tokens = [(seed * 1000 + turn % 5 * 37 + i) % 40_000 for i in range(2 * CHUNK)]
            try:
                cache.store(tokens, reference_kv(tokens, config))
                out, count = cache.retrieve(tokens)
                if count and not torch.equal(out, reference_kv(tokens, config)[:, :, :count]):
                    outcomes.append("wrong KV")
                cache.lease(tokens, ttl=60).release()  # from this thread: routed to the loop
                served.release()
            except CacheClosedError:
                outcomes.append("closed")
                return
            except Exception as exc:  # anything else is a failure of the test
                outcomes.append(f"{type(exc).__name__}: {exc}")
                return
            turn += 1

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(20):  # the threads are at work
        assert served.acquire(timeout=10)
    cache.close()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes == ["closed"] * 4


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_lease_is_released_from_any_thread_through_the_sync_cache(backend: Any) -> None:
    config = make_config(chunk_size=CHUNK)
    tokens = list(range(2 * CHUNK))
    with lmplug.SyncCache(config, backend=backend) as cache:
        cache.store(tokens, reference_kv(tokens, config))
        lease = cache.lease(tokens, ttl=60)
        assert cache.statistics().tiers[0].pinned == 2
        releaser = threading.Thread(target=lease.release)
        releaser.start()
        releaser.join(timeout=10)
        assert not lease.active
        assert cache.statistics().tiers[0].pinned == 0
        assert cache.statistics().leases == 0
        # A lease of the async cache, released off its loop thread, is refused (never a data race).
        raw = cache.call(cache.async_cache.lease, tokens)
        failures: list[BaseException] = []

        def release_raw() -> None:
            try:
                raw.release()
            except RuntimeError as exc:
                failures.append(exc)

        other = threading.Thread(target=release_raw)
        other.start()
        other.join(timeout=10)
        assert len(failures) == 1
        assert "event-loop thread" in str(failures[0])
        assert raw.active
        cache.release(raw)
        assert not raw.active
    lease.release()  # released already, the cache closed: nothing to do
