"""AsyncioBridge: an asyncio-only coroutine awaited from asyncio and from trio."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from lmplug_remote.bridge import AsyncioBridge


async def asyncio_only(value: int) -> tuple[int, str]:
    await asyncio.sleep(0.001)  # fails outside an asyncio loop
    return value * 2, threading.current_thread().name


async def test_runs_asyncio_code_on_either_loop(anyio_backend: str) -> None:
    bridge = AsyncioBridge("test")
    await bridge.start()
    try:
        results = []
        async with anyio.create_task_group() as group:
            for value in range(20):
                group.start_soon(lambda v=value: _collect(bridge, v, results))
        assert sorted(r[0] for r in results) == [v * 2 for v in range(20)]
        assert bridge.threaded == (anyio_backend == "trio")
        threads = {r[1] for r in results}
        assert (threads == {"lmplug-test-asyncio"}) == (anyio_backend == "trio")
    finally:
        await bridge.aclose()
    assert not any(t.name == "lmplug-test-asyncio" for t in threading.enumerate())


async def _collect(bridge: AsyncioBridge, value: int, results: list[tuple[int, str]]) -> None:
    results.append(await bridge.run(asyncio_only, value))


async def test_errors_propagate() -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("from the asyncio side")

    bridge = AsyncioBridge("test")
    await bridge.start()
    try:
        with pytest.raises(ValueError, match="asyncio side"):
            await bridge.run(boom)
    finally:
        await bridge.aclose()


async def test_cancelling_the_caller_cancels_the_work() -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    bridge = AsyncioBridge("test")
    await bridge.start()
    try:
        with anyio.move_on_after(0.05):
            await bridge.run(forever)
        assert await anyio.to_thread.run_sync(cancelled.wait, 5)
    finally:
        await bridge.aclose()
