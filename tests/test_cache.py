"""The cache API over the embedded default stack (one cpu tier)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import lmplug
from lmplug.errors import CacheClosedError, InvalidTokensError, KVDtypeError, KVShapeError, TokenCountMismatch
from lmplug.testing import make_config, reference_kv

CHUNK = 16


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 104_729) % 50_000 for i in range(length)]


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait until ``condition()`` holds (work the cache does in the background), at most ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the cache signals no event for its background evictions
            await anyio.sleep(0.005)


@pytest.fixture
def config() -> dict[str, Any]:
    return make_config([{"type": "cpu", "capacity": "1MiB"}], chunk_size=CHUNK)


async def test_store_then_lookup_and_retrieve_full_chunks(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(1, 3 * CHUNK + 5)
        kv = reference_kv(tokens, config)
        assert await cache.lookup(tokens) == 0
        assert await cache.store(tokens, kv) == 3 * CHUNK
        assert await cache.lookup(tokens) == 3 * CHUNK
        out, count = await cache.retrieve(tokens)
        assert count == 3 * CHUNK
        assert torch.equal(out, kv[:, :, :count])


async def test_partial_chunks_are_cached_when_configured(config: dict[str, Any]) -> None:
    config["save_partial_chunks"] = True
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(2, 2 * CHUNK + 5)
        kv = reference_kv(tokens, config)
        assert await cache.store(tokens, kv) == len(tokens)
        assert await cache.lookup(tokens) == len(tokens)
        # A longer prompt that extends them (the next turn of a chat) finds the partial chunk too.
        longer = [*tokens, 1, 2, 3]
        assert await cache.lookup(longer) == len(tokens)
        out, count = await cache.retrieve(longer)
        assert count == len(tokens)
        assert torch.equal(out, kv)
        buffer = torch.full((2, 2, len(longer), 8), -1.0)
        _, count = await cache.retrieve(longer, out=buffer)
        assert count == len(tokens)
        assert torch.equal(buffer[:, :, : len(tokens)], kv)
        # A prompt that differs inside the partial chunk does not (only whole chunks match).
        other = [*tokens[:-1], tokens[-1] + 1, 1, 2]
        assert await cache.lookup(other) == 2 * CHUNK
        # Shorter than the partial chunk: its KV cannot be told apart from another prompt's.
        assert await cache.lookup(tokens[:-2]) == 2 * CHUNK


async def test_partial_chunks_are_off_when_configured_so(config: dict[str, Any]) -> None:
    config["save_partial_chunks"] = False
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(2, 2 * CHUNK + 5)
        assert await cache.store(tokens, reference_kv(tokens, config)) == 2 * CHUNK
        assert await cache.lookup([*tokens, 1]) == 2 * CHUNK


async def test_a_partial_chunk_is_superseded_when_its_chunk_fills_up(config: dict[str, Any]) -> None:
    config["save_partial_chunks"] = True
    async with lmplug.open_cache(config) as cache:
        conversation = prompt(6, 3 * CHUNK)
        first = conversation[: CHUNK + 5]
        await cache.store(first, reference_kv(first, config))
        second = conversation[: CHUNK + 11]  # the same chunk, longer: replaces the 5-token one
        await cache.store(second, reference_kv(second, config)[:, :, CHUNK:], start=CHUNK)
        # Superseded chunks are evicted in the background.
        await eventually(lambda: cache.statistics().tiers[0].chunks == 2)
        assert await cache.lookup(conversation) == CHUNK + 11
        whole = conversation[: 2 * CHUNK + 3]  # the chunk is full now
        kv = reference_kv(whole, config)
        await cache.store(whole, kv[:, :, CHUNK:], start=CHUNK)
        await eventually(lambda: cache.statistics().tiers[0].chunks == 3)  # two full chunks, the new partial one
        out, count = await cache.retrieve(conversation)
        assert count == len(whole)
        assert torch.equal(out, kv)


async def test_a_lease_grows_as_lower_tiers_are_promoted(tmp_path: Any) -> None:
    config = make_config(
        [{"type": "cpu", "capacity": "1MiB"}, {"type": "disk", "path": str(tmp_path)}],
        chunk_size=CHUNK,
        save_partial_chunks=True,
    )
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(8, 4 * CHUNK + 3)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        await cache.drain()
        await cache.evict(tokens[: 4 * CHUNK], tiers=["cpu"])  # the full chunks are on disk only now
        held = await cache.lookup(tokens)
        assert held == len(tokens)
        lease = await cache.start_lease(tokens)
        assert not lease.ready.is_set() or lease.num_tokens == len(tokens)
        with anyio.fail_after(5):
            await lease.ready.wait()
        assert lease.num_tokens == len(tokens)
        assert sum(chunk.num_tokens for chunk in lease.chunks) == len(tokens)
        got = torch.cat([chunk.tensor for chunk in lease.chunks], dim=2)
        assert torch.equal(got, kv)
        lease.release()
        assert cache.statistics().tiers[0].chunks == 5  # promoted into host memory on the way


async def test_a_lease_released_while_it_grows_leaks_nothing(tmp_path: Any) -> None:
    config = make_config(
        [{"type": "cpu", "capacity": "1MiB"}, {"type": "disk", "path": str(tmp_path)}], chunk_size=CHUNK
    )
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(9, 6 * CHUNK)
        await cache.store(tokens, reference_kv(tokens, config))
        await cache.drain()
        await cache.evict(tokens, tiers=["cpu"])
        lease = await cache.start_lease(tokens)
        lease.release()
        with anyio.fail_after(5):
            await lease.ready.wait()
        # Chunks still arriving are released at once (or promoted): none is left over.
        await eventually(lambda: cache.statistics().allocator.used_bytes == cache.statistics().tiers[0].used_bytes)
        stats = cache.statistics()
        assert stats.leases == 0
        assert stats.tiers[0].pinned == 0


async def test_retrieve_into_a_caller_buffer(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(3, 2 * CHUNK)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        out = torch.full((2, 2, 3 * CHUNK, 8), -1.0)
        view, count = await cache.retrieve([*tokens, *prompt(4, CHUNK)], out=out)
        assert count == 2 * CHUNK
        assert view.data_ptr() == out.data_ptr()
        assert torch.equal(out[:, :, :count], kv)
        assert bool((out[:, :, count:] == -1).all())


async def test_a_too_small_out_buffer_is_rejected(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        with pytest.raises(KVShapeError, match="must cover 32 tokens"):
            await cache.retrieve(prompt(5, 2 * CHUNK), out=torch.empty(2, 2, CHUNK, 8))
        with pytest.raises(KVDtypeError):
            await cache.retrieve(prompt(5, CHUNK), out=torch.empty(2, 2, CHUNK, 8, dtype=torch.float16))


async def test_non_contiguous_kv_is_stored_correctly(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(6, 2 * CHUNK)
        kv = reference_kv(tokens, config)
        token_major = kv.permute(2, 0, 1, 3).contiguous()  # [tokens, 2, layers, hidden]
        await cache.store(tokens, token_major.permute(1, 2, 0, 3))
        out, _ = await cache.retrieve(tokens)
        assert torch.equal(out, kv)


@pytest.mark.parametrize(
    ("make_kv", "error", "message"),
    [
        (lambda n: torch.zeros(2, 2, n, 9), KVShapeError, "shape is"),
        (lambda n: torch.zeros(2, 3, n, 8), KVShapeError, "layers=2"),
        (lambda n: torch.zeros(1, 2, n, 8), KVShapeError, "shape is"),
        (lambda n: torch.zeros(2, 2, n, 8, dtype=torch.float16), KVDtypeError, "dtype is torch.float16"),
        (lambda n: torch.zeros(2, 2, n - 1, 8), TokenCountMismatch, "covers 31 tokens but 32"),
        (lambda n: [[0.0]] * n, KVShapeError, "must be a torch.Tensor"),
    ],
)
async def test_bad_kv_is_rejected_and_changes_nothing(
    config: dict[str, Any], make_kv: Any, error: type[Exception], message: str
) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(7, 2 * CHUNK)
        with pytest.raises(error, match=message):
            await cache.store(tokens, make_kv(len(tokens)))
        assert await cache.lookup(tokens) == 0
        assert cache.allocator.statistics().used_bytes == 0


async def test_bad_tokens_are_rejected(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        with pytest.raises(InvalidTokensError):
            await cache.lookup([1, -1])
        with pytest.raises(InvalidTokensError):
            await cache.store(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2, 6, 8))


async def test_storing_what_is_held_copies_nothing(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(8, 4 * CHUNK)
        await cache.store(tokens[: 2 * CHUNK], reference_kv(tokens[: 2 * CHUNK], config))
        stored_before = cache.statistics().tiers[0].stored
        assert await cache.store(tokens, reference_kv(tokens, config)) == 4 * CHUNK
        assert cache.statistics().tiers[0].stored == stored_before + 2


async def test_empty_and_short_prompts(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        assert await cache.lookup([]) == 0
        assert await cache.store([], torch.zeros(2, 2, 0, 8)) == 0
        short = prompt(9, CHUNK - 1)
        assert await cache.store(short, reference_kv(short, config)) == 0
        kv, count = await cache.retrieve(short)
        assert (count, tuple(kv.shape)) == (0, (2, 2, 0, 8))


async def test_memory_pressure_evicts_least_recently_used(config: dict[str, Any]) -> None:
    config["tiers"][0]["capacity"] = 4 * 4096  # four chunks of 16 tokens x 128 bytes, 4 KiB-aligned
    async with lmplug.open_cache(config) as cache:
        a, b, c = prompt(10, 2 * CHUNK), prompt(11, 2 * CHUNK), prompt(12, 2 * CHUNK)
        await cache.store(a, reference_kv(a, config))
        await cache.store(b, reference_kv(b, config))
        await cache.retrieve(a)  # a is now more recent than b
        assert await cache.store(c, reference_kv(c, config)) == 2 * CHUNK
        assert await cache.lookup(a) == 2 * CHUNK
        assert await cache.lookup(b) == 0
        assert await cache.lookup(c) == 2 * CHUNK
        assert cache.statistics().tiers[0].evictions == 2


async def test_leased_chunks_survive_pressure_until_the_lease_ends(config: dict[str, Any]) -> None:
    config["tiers"][0]["capacity"] = 2 * 4096
    async with lmplug.open_cache(config) as cache:
        a, b = prompt(13, 2 * CHUNK), prompt(14, 2 * CHUNK)
        await cache.store(a, reference_kv(a, config))
        lease = await cache.lease(a)
        assert lease.num_tokens == 2 * CHUNK
        # Every chunk is pinned: the store cannot make room, and says so instead of blocking.
        assert await cache.store(b, reference_kv(b, config)) == 0
        assert await cache.lookup(a) == 2 * CHUNK
        lease.release()
        lease.release()  # idempotent
        assert await cache.store(b, reference_kv(b, config)) == 2 * CHUNK
        assert await cache.lookup(a) == 0


async def test_leases_expire(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(15, CHUNK)
        await cache.store(tokens, reference_kv(tokens, config))
        lease = await cache.lease(tokens, ttl=0.05)
        assert cache.statistics().tiers[0].pinned == 1
        with anyio.fail_after(5):
            while lease.active:  # noqa: ASYNC110 - the lease has no event to wait on; expiry is what is tested
                await anyio.sleep(0.01)
        assert cache.statistics().tiers[0].pinned == 0
        assert cache.statistics().leases == 0
        assert b"lmplug_expired_leases_total 1.0" in cache.metrics.render()


async def test_lease_as_a_context_manager(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(16, CHUNK)
        await cache.store(tokens, reference_kv(tokens, config))
        async with await cache.lease(tokens) as lease:
            assert cache.statistics().leases == 1
        assert not lease.active
        assert cache.statistics().leases == 0


async def test_closing_releases_leases_and_memory(config: dict[str, Any]) -> None:
    cache = lmplug.open_cache(config)
    async with cache:
        tokens = prompt(17, 3 * CHUNK)
        await cache.store(tokens, reference_kv(tokens, config))
        lease = await cache.lease(tokens)
    assert not lease.active
    assert cache.allocator.statistics().used_bytes == 0


async def test_a_closed_cache_refuses_calls(config: dict[str, Any]) -> None:
    cache = lmplug.open_cache(config)
    with pytest.raises(CacheClosedError):
        await cache.lookup([1])
    async with cache:
        pass
    with pytest.raises(CacheClosedError):
        await cache.store([1], torch.zeros(2, 2, 1, 8))
    with pytest.raises(RuntimeError, match="only once"):
        async with cache:
            pass


async def test_evict_on_command(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(18, 3 * CHUNK)
        await cache.store(tokens, reference_kv(tokens, config))
        assert await cache.evict(tokens[:CHUNK]) == {"cpu": 1}
        assert await cache.lookup(tokens) == 0


async def test_metrics_count_the_data_path(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(19, 2 * CHUNK)
        await cache.lookup(tokens)
        await cache.store(tokens, reference_kv(tokens, config))
        await cache.lookup(tokens)
        await cache.retrieve(tokens)
        text = cache.metrics.render().decode()
    for line in [
        "lmplug_lookups_total 2.0",
        "lmplug_lookup_tokens_total 64.0",
        "lmplug_lookup_hit_tokens_total 32.0",
        "lmplug_stored_tokens_total 32.0",
        f"lmplug_stored_bytes_total {32 * 128}.0",
        "lmplug_retrieved_tokens_total 32.0",
        'lmplug_tier_chunks{tier="cpu",type="cpu"} 2.0',
        'lmplug_tier_capacity_bytes{tier="cpu",type="cpu"} 1.048576e+06',
    ]:
        assert line in text


async def test_different_prefixes_never_share_kv(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        shared = prompt(20, CHUNK)
        first = prompt(21, CHUNK) + shared
        second = prompt(22, CHUNK) + shared
        await cache.store(first, reference_kv(first, config))
        await cache.store(second, reference_kv(second, config))
        out, count = await cache.retrieve(second)
        assert count == 2 * CHUNK
        assert torch.equal(out, reference_kv(second, config))


async def test_many_concurrent_users(config: dict[str, Any]) -> None:
    config["tiers"][0]["capacity"] = 24 * 4096  # pressure: not everything fits
    async with lmplug.open_cache(config) as cache:
        system = prompt(23, 2 * CHUNK)
        wrong: list[int] = []
        served: list[int] = []

        async def user(seed: int) -> None:
            history = list(system)
            for turn in range(4):
                history += prompt(seed * 10 + turn, CHUNK + seed % 5)
                found = await cache.lookup(history)
                kv, count = await cache.retrieve(history)
                served.append(min(found, count))
                if not torch.equal(kv, reference_kv(history, config)[:, :, :count]):
                    wrong.append(seed)
                await cache.store(history, reference_kv(history, config))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as group:
            for seed in range(12):
                group.start_soon(user, seed)
        assert wrong == []
        # The system prompt every user shares stays cached under the pressure: every lookup and
        # retrieve but the very first (before any store) finds at least that much.
        assert sorted(served)[1] >= len(system)
        stats = cache.statistics()
        assert stats.allocator.used_bytes == stats.tiers[0].used_bytes


async def test_store_from_a_chunk_boundary(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(24, 4 * CHUNK)
        kv = reference_kv(tokens, config)
        assert await cache.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK]) == 2 * CHUNK
        assert await cache.store(tokens, kv[:, :, 2 * CHUNK :], start=2 * CHUNK) == 4 * CHUNK
        out, count = await cache.retrieve(tokens)
        assert count == 4 * CHUNK
        assert torch.equal(out, kv)
        with pytest.raises(lmplug.InvalidInputError, match="multiple of chunk_size"):
            await cache.store(tokens, kv[:, :, 5:], start=5)
        with pytest.raises(TokenCountMismatch):
            await cache.store(tokens, kv, start=CHUNK)


async def test_many_leases_with_mixed_time_outs_race_releases_retrieves_and_evicts(config: dict[str, Any]) -> None:
    """Hundreds of leases with time-outs from 0 to 100 ms, released early or left to expire,
    while other tasks retrieve and evict the same prompts: every pin goes, the table and its
    deadline heap shrink back, and every retrieve serves the right KV."""
    import random

    rng = random.Random(20261206)
    prompts = [prompt(100 + index, 2 * CHUNK) for index in range(8)]
    async with lmplug.open_cache(config) as cache:
        for tokens in prompts:
            assert await cache.store(tokens, reference_kv(tokens, config)) == 2 * CHUNK
        leases = []
        wrong: list[int] = []

        async def lease_and_maybe_release(index: int) -> None:
            lease = await cache.lease(prompts[index % len(prompts)], ttl=rng.random() / 10)
            leases.append(lease)
            if index % 3 == 0:
                await anyio.sleep(rng.random() / 20)
                lease.release()  # may race its own expiry

        async def retrieve_and_evict(index: int) -> None:
            tokens = prompts[index % len(prompts)]
            out, count = await cache.retrieve(tokens)
            if not torch.equal(out, reference_kv(tokens, config)[:, :, :count]):
                wrong.append(index)
            if index % 5 == 0:
                await cache.evict(tokens)  # pinned chunks stay; the rest go
                await cache.store(tokens, reference_kv(tokens, config))

        async with anyio.create_task_group() as group:
            for index in range(400):
                group.start_soon(lease_and_maybe_release, index)
                group.start_soon(retrieve_and_evict, index)
                if index % 50 == 0:
                    await anyio.sleep(0.01)
        await anyio.sleep(0.5)  # every time-out (100 ms at most) has passed
        assert cache.statistics().leases == 0
        assert wrong == []
        assert not any(lease.active for lease in leases)
        assert cache.statistics().tiers[0].pinned == 0
        assert len(cache._leases._deadlines) <= 64  # released leases' deadlines do not pile up
        assert cache.metrics.counts.expired_leases > 0  # some did expire rather than being released


async def test_a_key_domain_holds_its_own_kv_apart_from_prefix_kv(config: dict[str, Any]) -> None:
    # CacheBlend keys a passage's KV in its own domain: a lookup there finds the passage whole,
    # its trailing partial chunk included, and prefix lookups never see it (nor the reverse).
    async with lmplug.open_cache(config) as cache:
        passage = prompt(7, 2 * CHUNK + 5)
        kv = reference_kv(passage, config)
        assert await cache.store(passage, kv, domain="segments") == len(passage)
        assert await cache.lookup(passage) == 0
        assert await cache.lookup(passage, domain="segments") == len(passage)
        assert await cache.lookup(passage, domain="elsewhere") == 0
        out, count = await cache.retrieve(passage, domain="segments")
        assert count == len(passage)
        assert torch.equal(out, kv)
        buffer = torch.full(kv.shape, -1.0)
        _, count = await cache.retrieve(passage, out=buffer, domain="segments")
        assert count == len(passage)
        assert torch.equal(buffer, kv)
        # A shorter sequence matches its whole chunks only (a partial chunk names its tokens exactly).
        assert await cache.lookup(passage[:-1], domain="segments") == 2 * CHUNK
        async with await cache.lease(passage, domain="segments") as lease:
            assert lease.num_tokens == len(passage)
        # The same tokens stored as a prefix are separate chunks, evicted separately.
        assert await cache.store(passage, kv) == 2 * CHUNK
        assert await cache.evict(passage, domain="segments") == {"cpu": 3}
        assert await cache.lookup(passage, domain="segments") == 0
        assert await cache.lookup(passage) == 2 * CHUNK
