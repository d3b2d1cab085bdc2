"""Helpers shared by the p2p tier's tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import lmplug
from lmplug.testing import make_config

CHUNK = 16


def config(controller: str, instance: str, **p2p: Any) -> dict[str, Any]:
    """A ``cpu`` + ``p2p`` stack named ``instance``, with quick heartbeats."""
    return make_config(
        [
            {"type": "cpu", "capacity": "1MiB"},
            {"type": "p2p", "controller": controller, "instance_id": instance, "heartbeat": 0.1, **p2p},
        ],
        chunk_size=CHUNK,
    )


def prompt(seed: int, chunks: int) -> list[int]:
    return [(seed * 7717 + i * 13) % 30_000 for i in range(chunks * CHUNK)]


async def eventually(condition: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    """Poll ``condition`` until it is true, at most ``limit`` s (the controller's index follows
    events every 50 ms; nothing signals when it has)."""
    with anyio.fail_after(limit):
        while not await condition():  # noqa: ASYNC110 - polling another process's state
            await anyio.sleep(0.02)


def looks_up(cache: lmplug.Cache, tokens: list[int], expected: int) -> Callable[[], Awaitable[bool]]:
    """A condition: ``cache`` finds ``expected`` tokens of ``tokens``."""

    async def condition() -> bool:
        return await cache.lookup(tokens) == expected

    return condition
