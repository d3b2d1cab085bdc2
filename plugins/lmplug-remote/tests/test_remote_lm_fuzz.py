"""The ``lm://`` connector against a hostile server: mutated replies (headers, item tables,
lengths, ERROR frames, cut short, grown, sent in pieces) to every kind of call. It must raise
lmplug's errors or return exactly what the bytes say, never hang, crash or write past a
value into the caller's buffers (the oracle: ``lmplug_server.fuzzing.fuzz_client``)."""

from __future__ import annotations

import contextlib

import lmplug
from lmplug_remote.lm import LmOptions
from lmplug_remote.lm.connector import LmConnector
from lmplug_server.fuzzing import LmClient, fuzz_client

CASES_PER_BACKEND = 5000
SEEDS = {"asyncio": 7_2026_12, "trio": 8_2026_12}


def open_connector(url: str) -> contextlib.AbstractAsyncContextManager[LmClient]:
    return LmConnector(url, LmOptions(connections=1, connect_timeout=5.0))


async def test_the_connector_survives_a_hostile_server(anyio_backend: str) -> None:
    report = await fuzz_client(
        open_connector,
        (lmplug.TierUnavailable, lmplug.CorruptChunk),
        seed=SEEDS[anyio_backend],
        cases=CASES_PER_BACKEND,
    )
    assert report.cases == CASES_PER_BACKEND
    assert report.crashes == 0
    # not a parser that refuses everything: mutated and honest replies alike are read right
    assert report.outcomes["accepted"] > CASES_PER_BACKEND // 20
    assert report.outcomes["refused"] > CASES_PER_BACKEND // 2


async def test_deeply_nested_stats_json_is_an_unavailable_store_not_a_recursion_error() -> None:
    """Found by the fuzz: ``[[[[...`` as a STATS reply raised RecursionError through the connector."""
    import anyio
    import pytest
    from anyio.abc import SocketStream
    from anyio.streams.buffered import BufferedByteReceiveStream

    from lmplug.testing import free_port
    from lmplug_server import protocol

    port = free_port()

    async def hostile(stream: SocketStream) -> None:
        async with stream:
            buffered = BufferedByteReceiveStream(stream)
            while True:
                header = protocol.parse_request_header(
                    await buffered.receive_exactly(protocol.HEADER.size), protocol.Limits()
                )
                if header.body_length:
                    await buffered.receive_exactly(header.body_length)
                if header.opcode == protocol.Op.AUTH:
                    reply = protocol.encode_body_reply(
                        protocol.Op.AUTH, header.request_id, protocol.encode_limits(protocol.Limits())
                    )
                else:
                    reply = protocol.encode_body_reply(header.opcode, header.request_id, b"[" * 100_000)
                await stream.send(reply)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hostile)
        async with open_connector(f"lm://127.0.0.1:{port}") as connector:
            with pytest.raises(lmplug.TierUnavailable, match="RecursionError"):
                await connector.server_statistics()
        group.cancel_scope.cancel()
