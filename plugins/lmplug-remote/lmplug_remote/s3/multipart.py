"""Helpers of multipart uploads: cutting a value into parts, uploading them concurrently."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_PARTS", "run_all", "split"]

MAX_PARTS = 10_000


def split(parts: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """The concatenation of ``parts`` cut into pieces of ``size`` bytes (the last shorter), as views."""
    pieces: list[list[memoryview]] = [[]]
    room = size
    for part in parts:
        offset = 0
        while offset < len(part):
            if room == 0:
                pieces.append([])
                room = size
            take = min(room, len(part) - offset)
            pieces[-1].append(part[offset : offset + take])
            offset += take
            room -= take
    return pieces


async def run_all(calls: Any) -> None:
    """Await the coroutines concurrently; the first failure cancels the rest and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for call in calls:
                group.create_task(call)
    except BaseExceptionGroup as exc:
        failures = exc.subgroup(lambda e: not isinstance(e, asyncio.CancelledError))
        if failures is None:
            raise
        first: BaseException = failures.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
