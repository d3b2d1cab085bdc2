"""The P2P transfer layer in one process: round trips, short runs, refusals, bad bytes, a peer
that vanishes, timeouts, cancellation and limits. Every test runs on asyncio and trio."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest
import torch

from lmplug.testing import free_port
from lmplug.tierkit import HEADER, KVChunk, KVLayout
from lmplug_p2p import protocol
from lmplug_p2p.protocol import ErrorCode, FrameType, Limits
from lmplug_p2p.transfer import (
    PeerClient,
    TcpTransport,
    TransferServer,
    TransportSettings,
    open_transport,
    parse_endpoint,
)

from p2p_transfer_testing import (
    FINGERPRINT,
    OTHER_FINGERPRINT,
    TOKENS,
    CountingAllocator,
    Holder,
    eventually,
    make_key,
    make_kv,
    make_layout,
    tampering_proxy,
    token_counts,
)

TIMEOUT = 10.0


@pytest.fixture
def layout() -> KVLayout:
    return make_layout()


@pytest.fixture
async def client() -> AsyncIterator[PeerClient]:
    peer = PeerClient(FINGERPRINT)
    yield peer
    await peer.aclose()


def serving(holder: Holder, **options: object) -> TransferServer:
    return TransferServer(holder.serve, holder.contains, fingerprint=FINGERPRINT, layout=holder.layout, **options)  # type: ignore[arg-type]


def assert_chunks(chunks: Sequence[KVChunk], layout: KVLayout, counts: Sequence[int]) -> None:
    """``chunks`` are chunks ``0..len-1`` of ``make_kv``, bit for bit."""
    for index, chunk in enumerate(chunks):
        assert torch.equal(chunk.tensor, make_kv(layout, index, counts[index])), f"chunk {index} differs"


def release(chunks: Sequence[KVChunk]) -> None:
    for chunk in chunks:
        chunk.release()


def record_bytes(layout: KVLayout, tokens: int = TOKENS) -> int:
    return HEADER.size + layout.nbytes(tokens)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("count", [1, 2, 7])
@pytest.mark.parametrize("last", [TOKENS, 5], ids=["full", "partial"])
async def test_round_trip_of_whole_and_partial_chunks(
    client: PeerClient, dtype: torch.dtype, count: int, last: int
) -> None:
    layout = make_layout(dtype)
    counts = token_counts(count, last)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    async with serving(holder) as server:
        chunks = await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == count
        assert_chunks(chunks, layout, counts)
        assert [chunk.num_tokens for chunk in chunks] == counts
        assert allocator.statistics().allocations == count
        release(chunks)
        assert allocator.statistics().allocations == 0
        assert holder.outstanding() == 0
        served = server.statistics()
        assert served.chunks_served == count
        assert served.bytes_served == sum(layout.nbytes(tokens) for tokens in counts)
    stats = client.statistics()
    assert (stats.fetches, stats.chunks, stats.failures) == (1, count, {})


async def test_token_counts_may_come_from_the_peer(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(4, 3)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    async with serving(holder, limits=Limits(max_keys=3)) as server:
        chunks = await client.fetch(server.endpoint, holder.keys, None, allocator, layout, timeout=TIMEOUT)
        assert [chunk.num_tokens for chunk in chunks] == counts
        assert_chunks(chunks, layout, counts)
        release(chunks)
    with pytest.raises(ValueError, match="2 keys but 1 token counts"):
        await client.fetch(server.endpoint, holder.keys[:2], [TOKENS], allocator, layout, timeout=TIMEOUT)


async def test_the_server_may_serve_a_shorter_run(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(5)
    holder = Holder(layout, counts, held=2)
    allocator = CountingAllocator(layout)
    async with serving(holder) as server:
        chunks = await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 2
        assert_chunks(chunks, layout, counts)
        assert await client.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 2
        release(chunks)
    assert client.statistics().failures == {}  # a short run is an answer, not a failure
    assert client.statistics().connections_opened == 1  # and the connection was reused


async def test_exists_counts_the_leading_keys_in_batches(client: PeerClient, layout: KVLayout) -> None:
    holder = Holder(layout, token_counts(9), held=7)
    async with serving(holder, limits=Limits(max_keys=3)) as server:
        assert await client.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 7
        assert await client.exists(server.endpoint, holder.keys[:3], timeout=TIMEOUT) == 3
        assert await client.exists(server.endpoint, [make_key(99), *holder.keys], timeout=TIMEOUT) == 0
        await eventually(lambda: server.statistics().requests.get("EXISTS") == 3 + 1 + 1)


async def test_requests_stay_within_the_servers_limits(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(5)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    limits = Limits(max_keys=2, max_bytes=2 * record_bytes(layout))
    async with serving(holder, limits=limits) as server:
        chunks = await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 5
        assert_chunks(chunks, layout, counts)
        await eventually(lambda: server.statistics().requests.get("GET") == 3)  # counted once written
        release(chunks)


async def test_the_transport_seam_builds_both_sides(layout: KVLayout) -> None:
    settings = TransportSettings(FINGERPRINT, layout, token="secret")
    transport = open_transport("tcp", settings)
    assert isinstance(transport, TcpTransport)
    counts = token_counts(3, 4)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    peer = transport.client()
    async with transport.server(holder.serve, holder.contains, host="127.0.0.1", port=0) as server:
        chunks = await peer.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 3
        assert_chunks(chunks, layout, counts)
        release(chunks)
    await peer.aclose()
    with pytest.raises(ValueError, match="unknown transport 'nixl'; known: tcp"):
        open_transport("nixl", settings)


# ---------------------------------------------------------------------------- refusals


async def test_a_foreign_fingerprint_is_refused_naming_both(layout: KVLayout, caplog: pytest.LogCaptureFixture) -> None:
    holder = Holder(layout, token_counts(2))
    allocator = CountingAllocator(layout)
    stranger = PeerClient(OTHER_FINGERPRINT)
    async with serving(holder) as server:
        with caplog.at_level(logging.WARNING, "lmplug.p2p"):
            chunks = await stranger.fetch(
                server.endpoint, holder.keys, token_counts(2), allocator, layout, timeout=TIMEOUT
            )
        assert chunks == []
        assert server.statistics().errors == {"fingerprint_mismatch": 1}
    await stranger.aclose()
    assert stranger.statistics().failures == {"fingerprint_mismatch": 1}
    assert FINGERPRINT.hex() in caplog.text
    assert OTHER_FINGERPRINT.hex() in caplog.text
    assert allocator.statistics().allocations == 0


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_a_server_with_a_token_refuses_others(layout: KVLayout, token: str | None) -> None:
    holder = Holder(layout, token_counts(1))
    stranger = PeerClient(FINGERPRINT, token=token)
    async with serving(holder, token="secret") as server:
        assert await stranger.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 0
        friend = PeerClient(FINGERPRINT, token="secret")
        assert await friend.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 1
        await friend.aclose()
    await stranger.aclose()
    assert stranger.statistics().failures == {"auth_failed": 1}


async def test_a_refused_connection_returns_nothing_at_once(client: PeerClient, layout: KVLayout) -> None:
    allocator = CountingAllocator(layout)
    start = time.monotonic()
    chunks = await client.fetch(f"127.0.0.1:{free_port()}", [make_key(0)], [TOKENS], allocator, layout, timeout=TIMEOUT)
    assert chunks == []
    assert time.monotonic() - start < 2
    assert client.statistics().failures == {"refused": 1}


async def test_a_bad_endpoint_is_a_failure_not_an_exception(client: PeerClient, layout: KVLayout) -> None:
    allocator = CountingAllocator(layout)
    assert await client.fetch("no-port", [make_key(0)], [TOKENS], allocator, layout, timeout=TIMEOUT) == []
    assert client.statistics().failures == {"endpoint": 1}
    with pytest.raises(ValueError, match="not a host:port endpoint"):
        parse_endpoint("host:99999")
    assert parse_endpoint("[::1]:80") == ("::1", 80)


# ---------------------------------------------------------------------------- bad bytes and vanishing peers


@pytest.mark.parametrize("where", ["payload", "header"])
async def test_a_corrupted_chunk_and_those_after_it_are_dropped(
    client: PeerClient, layout: KVLayout, where: str
) -> None:
    counts = token_counts(4)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    offset = HEADER.size + 1000 if where == "payload" else 40  # into chunk 2's payload, or its header's key
    async with (
        serving(holder) as server,
        tampering_proxy(server.endpoint, flip_at=2 * record_bytes(layout) + offset) as via,
    ):
        chunks = await client.fetch(via, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 2
        assert_chunks(chunks, layout, counts)
        assert allocator.statistics().allocations == 2  # the bad chunk went back
        release(chunks)
        assert allocator.statistics().allocations == 0
        # The connection was dropped; a fresh one works.
        assert await client.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 4
    stats = client.statistics()
    assert stats.failures == {"corrupt": 1}
    assert stats.connections_dropped == 1


async def test_a_chunk_of_other_length_than_expected_ends_the_run(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(3)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    async with serving(holder) as server:
        chunks = await client.fetch(
            server.endpoint, holder.keys, [TOKENS, 7, TOKENS], allocator, layout, timeout=TIMEOUT
        )
        assert len(chunks) == 1
        release(chunks)
    assert client.statistics().failures == {"corrupt": 1}
    assert allocator.statistics().allocations == 0


@pytest.mark.parametrize("cut", [0, 1, HEADER.size + 100, HEADER.size])
async def test_a_peer_vanishing_mid_transfer_leaves_the_prefix(client: PeerClient, layout: KVLayout, cut: int) -> None:
    counts = token_counts(5)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    async with (
        serving(holder) as server,
        tampering_proxy(server.endpoint, cut_at=2 * record_bytes(layout) + cut) as via,
    ):
        with anyio.fail_after(5):
            chunks = await client.fetch(via, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 2
        assert_chunks(chunks, layout, counts)
        release(chunks)
    assert allocator.statistics().allocations == 0
    assert client.statistics().failures == {"connection": 1}


async def test_a_full_allocator_ends_the_run(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(4)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout, capacity=3)
    async with serving(holder) as server:
        chunks = await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 3
        release(chunks)
        await eventually(lambda: not holder.outstanding())  # the server gives its chunks back
    assert client.statistics().failures == {"no_memory": 1}


# ---------------------------------------------------------------------------- time and cancellation


async def test_a_stalled_peer_times_out_with_nothing(client: PeerClient, layout: KVLayout) -> None:
    holder = Holder(layout, token_counts(2))
    holder.blocked = anyio.Event()
    allocator = CountingAllocator(layout)
    async with serving(holder) as server:
        start = time.monotonic()
        chunks = await client.fetch(server.endpoint, holder.keys, token_counts(2), allocator, layout, timeout=0.3)
        assert chunks == []
        assert 0.25 < time.monotonic() - start < 2
        assert await client.exists(server.endpoint, holder.keys, timeout=0.3) == 2  # EXISTS does not wait on serve
        holder.blocked.set()
        await eventually(lambda: not holder.outstanding() and server.statistics().open_connections == 1)
    assert client.statistics().failures == {"timeout": 1}
    assert client.statistics().connections_dropped == 1


async def test_a_cancelled_fetch_closes_its_connection(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(2)
    holder = Holder(layout, counts)
    holder.blocked = anyio.Event()
    allocator = CountingAllocator(layout)
    async with serving(holder) as server:
        with anyio.move_on_after(0.2) as scope:
            await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert scope.cancelled_caught
        stats = client.statistics()
        assert (stats.connections_opened, stats.connections_dropped, stats.failures) == (1, 1, {})
        holder.blocked.set()
        await eventually(lambda: not holder.outstanding() and not server.statistics().open_connections)
        chunks = await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 2
        release(chunks)
    assert client.statistics().connections_opened == 2
    assert allocator.statistics().allocations == 0


async def test_a_pooled_connection_the_server_closed_is_replaced(client: PeerClient, layout: KVLayout) -> None:
    counts = token_counts(2)
    holder = Holder(layout, counts)
    allocator = CountingAllocator(layout)
    async with serving(holder) as server:
        endpoint = server.endpoint
        assert await client.exists(endpoint, holder.keys, timeout=TIMEOUT) == 2
    assert await client.exists(endpoint, holder.keys, timeout=TIMEOUT) == 0  # the server is gone
    assert client.statistics().failures == {"refused": 1}
    async with serving(holder, port=parse_endpoint(endpoint)[1]) as server:
        chunks = await client.fetch(server.endpoint, holder.keys, counts, allocator, layout, timeout=TIMEOUT)
        assert len(chunks) == 2
        release(chunks)
    assert client.statistics().connections_opened == 2


async def test_a_closed_client_fetches_nothing(layout: KVLayout) -> None:
    holder = Holder(layout, token_counts(1))
    peer = PeerClient(FINGERPRINT)
    async with serving(holder) as server:
        assert await peer.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 1
        await peer.aclose()
        assert await peer.exists(server.endpoint, holder.keys, timeout=TIMEOUT) == 0
    assert peer.statistics().failures == {"closed": 1}
    assert peer.statistics().connections_dropped == 1


# ---------------------------------------------------------------------------- broken frames


def hello(fingerprint: bytes = FINGERPRINT) -> bytes:
    return protocol.encode_frame(FrameType.HELLO, 1, {"fingerprint": fingerprint.hex()})


def keys_frame(frame_type: FrameType, count: int, meta: dict[str, object] | None = None) -> bytes:
    return protocol.encode_keys(frame_type, 2, [make_key(index) for index in range(count)], meta)


BROKEN = {
    "bad magic": (hello()[:24].replace(b"LMPX", b"XXXX"), ErrorCode.BAD_MAGIC),
    "get before hello": (keys_frame(FrameType.GET, 1, {"max_bytes": 1}), ErrorCode.HELLO_REQUIRED),
    "unknown type": (hello() + protocol.FRAME.pack(b"LMPX", 1, 0x55, 0, 2, 0, 0), ErrorCode.UNKNOWN_TYPE),
    "future version": (
        hello() + protocol.FRAME.pack(b"LMPX", 2, FrameType.GET, 0, 2, 0, 0),
        ErrorCode.UNSUPPORTED_VERSION,
    ),
    "too many keys": (hello() + keys_frame(FrameType.EXISTS, 5), ErrorCode.TOO_MANY_KEYS),
    "meta too large": (
        hello() + protocol.FRAME.pack(b"LMPX", 1, FrameType.GET, 0, 2, 1 << 20, 24),
        ErrorCode.META_TOO_LARGE,
    ),
    "partial key": (hello() + protocol.FRAME.pack(b"LMPX", 1, FrameType.EXISTS, 0, 2, 0, 23), ErrorCode.MALFORMED),
    "meta not json": (
        hello() + protocol.FRAME.pack(b"LMPX", 1, FrameType.GET, 0, 2, 3, 0) + b"{x}",
        ErrorCode.MALFORMED,
    ),
    "get without max_bytes": (hello() + keys_frame(FrameType.GET, 1), ErrorCode.MALFORMED),
    "flags": (hello() + protocol.FRAME.pack(b"LMPX", 1, FrameType.EXISTS, 1, 2, 0, 0), ErrorCode.MALFORMED),
    "a reply as a request": (
        hello() + protocol.encode_frame(FrameType.EXISTS_REPLY, 2, {"n": 0}),
        ErrorCode.UNKNOWN_TYPE,
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
async def test_a_broken_frame_gets_an_error_and_a_closed_connection(layout: KVLayout, name: str) -> None:
    frames, code = BROKEN[name]
    holder = Holder(layout, token_counts(1))
    async with serving(holder, limits=Limits(max_keys=4, max_meta=1024)) as server:
        host, port = parse_endpoint(server.endpoint)
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(frames)
            received = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        if name not in ("bad magic", "get before hello"):
            assert received[5] == FrameType.HELLO_OK
            received = received[protocol.FRAME.size + protocol.FRAME.unpack(received[:24])[5] :]
        _, _, kind, _, _, meta_length, _ = protocol.FRAME.unpack(received[:24])
        assert kind == FrameType.ERROR
        error = protocol.parse_error(protocol.parse_meta(received[24 : 24 + meta_length]))
        assert error.code is code
        assert server.statistics().errors == {code.name.lower(): 1}


async def test_a_peer_that_never_says_hello_is_dropped(layout: KVLayout) -> None:
    holder = Holder(layout, token_counts(1))
    server = TransferServer(holder.serve, holder.contains, fingerprint=FINGERPRINT, layout=layout, hello_timeout=0.2)
    async with server:
        host, port = parse_endpoint(server.endpoint)
        with socket.create_connection((host, port)) as sock:
            sock.settimeout(5)
            await eventually(lambda: bool(server.statistics().errors))
            assert server.statistics().errors == {"timeout": 1}
