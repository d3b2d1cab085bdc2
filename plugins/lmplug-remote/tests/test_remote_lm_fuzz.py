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
