"""The pd tier between two caches in this process, over loopback TCP: what a push delivers, what
the receiver refuses, and what each failure leaves behind (a verified prefix, nothing leaked)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import anyio
import pytest
from pd_transfer_testing import (
    CHUNK,
    CHUNK_BYTES,
    assert_settled,
    eventually,
    pair,
    pd_tier,
    prompt,
    received,
    sent,
    serves,
    stack,
    store,
    tampering_proxy,
)

import lmplug
from lmplug.testing import assert_readme_documents, free_port
from lmplug_pd.options import PDTierConfig


@pytest.mark.parametrize("length", [5, CHUNK, 3 * CHUNK + 5, 8 * CHUNK])
async def test_a_push_lands_byte_identical(length: int) -> None:
    """Whole chunks and a trailing partial one: the decode cache then serves exactly the prefill's KV."""
    config = stack()
    async with pair() as (prefill, decode, endpoint):
        tokens = prompt(1, length)
        await store(prefill, config, tokens)
        assert await decode.transfer_state("t1") is None  # not opened yet
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == length
        assert await decode.transfer_state("t1") == "completed"
        assert await decode.lookup(tokens) == length
        assert await serves(decode, config, tokens) == length
        chunks = -(-length // CHUNK)
        assert received(decode) | {"endpoint": None} == received(decode) | {
            "endpoint": None,
            "transfers": 1,
            "completed": 1,
            "chunks_admitted": chunks,
            "chunks_present": 0,
            "held_chunks": chunks,
        }
        assert sent(prefill)["chunks"] == chunks
        assert sent(prefill)["failed"] == {}
        assert_settled(prefill, decode, holds=1)


async def test_only_cached_chunks_go() -> None:
    config = stack()
    async with pair() as (prefill, decode, endpoint):
        tokens = prompt(2, 4 * CHUNK)
        await store(prefill, config, tokens[: 2 * CHUNK])
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == 2 * CHUNK
        assert await decode.lookup(tokens) == 2 * CHUNK
        nothing = prompt(3, 2 * CHUNK)
        assert await prefill.push(nothing, destination=endpoint, transfer_id="t2", timeout=5) == 0
        assert received(decode)["transfers"] == 1  # nothing held: not even a connection


async def test_chunks_the_decode_holds_are_not_resent() -> None:
    config = stack()
    async with pair() as (prefill, decode, endpoint):
        tokens = prompt(4, 5 * CHUNK)
        await store(prefill, config, tokens)
        await store(decode, config, tokens[: 2 * CHUNK])
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == len(tokens)
        assert (received(decode)["chunks_present"], received(decode)["chunks_admitted"]) == (2, 3)
        assert sent(prefill)["bytes"] == 3 * CHUNK_BYTES
        assert await serves(decode, config, tokens) == len(tokens)


async def test_a_transfer_larger_than_the_budget_is_refused_at_once() -> None:
    config = stack()
    async with pair(receiver=stack(max_inflight=2 * CHUNK_BYTES, admit_timeout=5)) as (prefill, decode, endpoint):
        tokens = prompt(5, 3 * CHUNK)
        await store(prefill, config, tokens)
        start = time.monotonic()
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=10) == 0
        assert time.monotonic() - start < 2
        assert received(decode)["rejected"] == {"too_large": 1}
        assert sent(prefill)["failed"] == {"rejected_too_large": 1}
        assert await decode.transfer_state("t1") == "rejected"  # a decode waiting for it stops at once
        assert await decode.lookup(tokens) == 0
        assert_settled(decode, holds=0)


async def test_a_transfer_waits_for_room_then_is_refused_busy() -> None:
    """The budget fits one transfer; a second waits ``admit_timeout`` behind a stalled one, then is refused."""
    config = stack()
    receiver = stack(max_inflight=3 * CHUNK_BYTES, admit_timeout=0.3)
    async with (
        pair(stack(debug_chunk_delay=0.5), receiver) as (slow, decode, endpoint),
        lmplug.open_cache(stack()) as fast,
    ):
        first, second = prompt(6, 3 * CHUNK), prompt(7, 3 * CHUNK)
        await store(slow, config, first)
        await store(fast, config, second)
        async with anyio.create_task_group() as group:
            group.start_soon(partial(slow.push, first, destination=endpoint, transfer_id="slow", timeout=10))
            await eventually(lambda: received(decode)["inflight_bytes"] > 0)
            start = time.monotonic()
            assert await fast.push(second, destination=endpoint, transfer_id="fast", timeout=10) == 0
            assert 0.25 <= time.monotonic() - start < 2
            assert received(decode)["rejected"] == {"busy": 1}
            group.cancel_scope.cancel()
        await eventually(lambda: received(decode)["inflight_bytes"] == 0)
        # The budget is back: the same transfer, refused before, goes now.
        assert await fast.push(second, destination=endpoint, transfer_id="fast", timeout=10) == len(second)


async def test_a_sender_cancelled_after_k_chunks_leaves_exactly_k() -> None:
    config = stack()
    async with pair(stack(debug_chunk_delay=0.2)) as (prefill, decode, endpoint):
        tokens = prompt(8, 6 * CHUNK)
        await store(prefill, config, tokens)
        async with anyio.create_task_group() as group:
            group.start_soon(partial(prefill.push, tokens, destination=endpoint, transfer_id="t1", timeout=10))
            await eventually(lambda: received(decode)["chunks_admitted"] == 2)
            assert await decode.transfer_state("t1") == "receiving"
            group.cancel_scope.cancel()
        await eventually(lambda: received(decode)["inflight_bytes"] == 0)
        assert received(decode)["failed"] == {"connection": 1}
        assert await decode.transfer_state("t1") == "failed"
        assert await decode.lookup(tokens) == 2 * CHUNK
        assert await serves(decode, config, tokens) == 2 * CHUNK
        assert_settled(prefill, decode, holds=1)


async def test_a_flipped_byte_drops_that_chunk_and_the_later_ones() -> None:
    config = stack()
    async with pair() as (prefill, decode, endpoint):
        tokens = prompt(9, 5 * CHUNK)
        await store(prefill, config, tokens)
        async with tampering_proxy(endpoint, flip_chunk=2) as proxy:
            assert await prefill.push(tokens, destination=proxy, transfer_id="t1", timeout=5) == 2 * CHUNK
        assert received(decode)["failed"] == {"corrupt": 1}
        assert sent(prefill)["failed"] == {"partial": 1}
        assert await decode.lookup(tokens) == 2 * CHUNK
        assert await serves(decode, config, tokens) == 2 * CHUNK
        assert_settled(decode, holds=1)


async def test_a_full_pool_of_held_chunks_ends_the_transfer_with_what_arrived() -> None:
    """Held chunks cannot be evicted: once the pool is full of them, the next chunk finds no memory."""
    config = stack()
    async with pair(receiver=stack(cpu="16KiB")) as (prefill, decode, endpoint):
        tokens = prompt(10, 16 * CHUNK)
        await store(prefill, config, tokens)
        pushed = await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5)
        assert 0 < pushed < len(tokens)
        assert received(decode)["failed"] == {"no_memory": 1}
        assert await decode.lookup(tokens) == pushed
        assert await serves(decode, config, tokens) == pushed


async def test_a_fingerprint_mismatch_is_refused_naming_both() -> None:
    config = stack()
    async with pair(receiver=stack(model="another-model")) as (prefill, decode, endpoint):
        tokens = prompt(11, 2 * CHUNK)
        await store(prefill, config, tokens)
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == 0
        assert sent(prefill)["failed"] == {"fingerprint_mismatch": 1}
        assert received(decode)["transfers"] == 0


async def test_the_token_must_match(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PD_TOKEN_D", "right")
    monkeypatch.setenv("PD_TOKEN_P", "wrong")
    monkeypatch.setenv("PD_TOKEN_Q", "right")
    config = stack()
    async with pair(stack(token_env="PD_TOKEN_P"), stack(token_env="PD_TOKEN_D")) as (prefill, _, endpoint):
        tokens = prompt(12, 2 * CHUNK)
        await store(prefill, config, tokens)
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == 0
        assert sent(prefill)["failed"] == {"auth_failed": 1}
        assert f"push t1 to {endpoint} failed (auth_failed" in caplog.text
        async with lmplug.open_cache(stack(token_env="PD_TOKEN_Q")) as right:
            await store(right, config, tokens)
            assert await right.push(tokens, destination=endpoint, transfer_id="t2", timeout=5) == len(tokens)


async def test_a_destination_refusing_connections_is_0_quickly() -> None:
    config = stack()
    async with lmplug.open_cache(config) as prefill:
        tokens = prompt(13, 2 * CHUNK)
        await store(prefill, config, tokens)
        start = time.monotonic()
        destination = f"127.0.0.1:{free_port()}"
        assert await prefill.push(tokens, destination=destination, transfer_id="t1", timeout=5) == 0
        assert time.monotonic() - start < 1
        assert sent(prefill)["failed"] == {"refused": 1}
        assert await prefill.push(tokens, destination="nowhere", transfer_id="t2", timeout=5) == 0
        assert sent(prefill)["failed"] == {"refused": 1, "endpoint": 1}


async def test_a_transfer_id_is_accepted_once() -> None:
    config = stack()
    async with pair() as (prefill, decode, endpoint):
        tokens = prompt(14, 2 * CHUNK)
        await store(prefill, config, tokens)
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == len(tokens)
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == 0
        assert received(decode)["rejected"] == {"duplicate": 1}
        assert sent(prefill)["failed"] == {"rejected_duplicate": 1}


async def test_a_hold_ends_and_the_chunks_stay_cached() -> None:
    config = stack()
    async with pair(receiver=stack(hold=0.2)) as (prefill, decode, endpoint):
        tokens = prompt(15, 3 * CHUNK)
        await store(prefill, config, tokens)
        assert await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=5) == len(tokens)
        assert received(decode)["holds"] == 1
        await eventually(lambda: received(decode)["holds"] == 0)
        assert received(decode)["held_chunks"] == 0
        assert pd_tier(decode).statistics().chunks == 0
        assert await serves(decode, config, tokens) == len(tokens)  # from the cpu tier, now evictable
        await decode.evict(tokens)
        assert await decode.lookup(tokens) == 0


async def test_closing_the_decode_mid_transfer_ends_cleanly() -> None:
    config = stack()
    async with lmplug.open_cache(stack(debug_chunk_delay=0.2)) as prefill:
        tokens = prompt(16, 6 * CHUNK)
        await store(prefill, config, tokens)
        decode = lmplug.open_cache(stack())
        results: list[int] = []
        async with anyio.create_task_group() as group, decode:
            endpoint = pd_tier(decode).endpoint

            async def push() -> None:
                results.append(await prefill.push(tokens, destination=endpoint, transfer_id="t1", timeout=10))

            group.start_soon(push)
            await eventually(lambda: received(decode)["chunks_admitted"] == 1)
        assert results == [0]  # the connection broke before DONE: nothing confirmed
        assert sent(prefill)["failed"] == {"connection": 1}
        stats = received(decode)
        assert (stats["inflight_bytes"], stats["holds"], stats["held_chunks"]) == (0, 0, 0)
        assert stats["failed"] == {"cancelled": 1}
        assert decode.allocator.statistics().allocations == 0


def test_the_readme_documents_every_pd_option() -> None:
    assert_readme_documents(Path(__file__).parents[1] / "README.md", PDTierConfig, section="Configuration")
