"""The P2P transfer layer across real processes: a peer serving from its own memory, and a peer
killed in the middle of a transfer."""

from __future__ import annotations

import time

import anyio
import pytest
import torch

from lmplug_p2p.transfer import PeerClient

from p2p_transfer_testing import FINGERPRINT, TOKENS, CountingAllocator, make_key, make_kv, make_layout, peer_process


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
async def test_chunks_travel_between_processes(dtype: str) -> None:
    layout = make_layout(getattr(torch, dtype))
    keys = [make_key(index) for index in range(6)]
    allocator = CountingAllocator(layout)
    client = PeerClient(FINGERPRINT)
    with peer_process(dtype, 4, TOKENS) as (_, endpoint):
        assert await client.exists(endpoint, keys, timeout=10) == 4
        chunks = await client.fetch(endpoint, keys, [TOKENS] * 6, allocator, layout, timeout=10)
        assert len(chunks) == 4  # the peer holds 4 of the 6
        for index, chunk in enumerate(chunks):
            assert torch.equal(chunk.tensor, make_kv(layout, index, TOKENS))
            chunk.release()
    await client.aclose()
    assert allocator.statistics().allocations == 0
    assert client.statistics().failures == {}


async def test_a_peer_killed_mid_transfer_leaves_a_verified_prefix() -> None:
    count, tokens, layers = 24, 1024, 16  # 24 chunks of 4 MiB
    layout = make_layout(torch.bfloat16, layers)
    keys = [make_key(index) for index in range(count)]
    client = PeerClient(FINGERPRINT)
    with peer_process("bfloat16", count, tokens, layers) as (process, endpoint):
        assert await client.exists(endpoint, keys, timeout=10) == count  # connected; the chunks are made

        def kill_at_third(allocations: int) -> None:
            if allocations == 3:
                process.kill()

        allocator = CountingAllocator(layout, on_allocate=kill_at_third)
        start = time.monotonic()
        with anyio.fail_after(20):
            chunks = await client.fetch(endpoint, keys, [tokens] * count, allocator, layout, timeout=15)
        assert time.monotonic() - start < 10  # the end of the stream is noticed, not waited out
    assert 2 <= len(chunks) < count
    for index, chunk in enumerate(chunks):
        assert torch.equal(chunk.tensor, make_kv(layout, index, tokens))
    assert allocator.statistics().allocations == len(chunks)  # nothing else kept
    for chunk in chunks:
        chunk.release()
    assert allocator.statistics().allocations == 0
    assert client.statistics().failures == {"connection": 1}
    assert await client.exists(endpoint, keys, timeout=10) == 0  # dead: refused
    await client.aclose()
