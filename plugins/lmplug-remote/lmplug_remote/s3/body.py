"""Request and response bodies made of the caller's memory, without joining or extra copies."""

from __future__ import annotations

import bisect
import io
import itertools
from collections.abc import Sequence
from typing import Any

import aiohttp

from lmplug import CorruptChunk

__all__ = ["PartsReader", "bytes_view", "read_into"]


def bytes_view(part: memoryview) -> memoryview:
    return part if part.format == "B" and part.ndim == 1 else part.cast("B")


class PartsReader(io.BytesIO):
    """The concatenation of memoryviews as a read-only, seekable file, without joining them.

    botocore reads it to sign the payload and rewinds it to retry; aiohttp sends what
    ``read`` returns (views of the caller's memory). A :class:`io.BytesIO` (subclass) is what
    aiohttp streams on the event loop in 64 KiB writes (other files it reads in threads).
    """

    def __init__(self, parts: Sequence[memoryview]) -> None:
        super().__init__()
        self._parts = [part for part in parts if len(part)]
        self._ends = list(itertools.accumulate(len(part) for part in self._parts))
        self._size = self._ends[-1] if self._ends else 0
        self._position = 0

    def __len__(self) -> int:
        return self._size - self._position

    def getbuffer(self) -> Any:  # aiohttp asks it for the size left to send
        return _Remaining(self._size - self._position)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = min(max(base + offset, 0), self._size)
        return self._position

    def read(self, size: int | None = -1) -> Any:
        start = self._position
        stop = self._size if size is None or size < 0 else min(self._size, start + size)
        if stop <= start:
            return b""
        self._position = stop
        index = bisect.bisect_right(self._ends, start)
        first = start - (self._ends[index] - len(self._parts[index]))
        if stop <= self._ends[index]:  # within one part: a view, no copy
            return self._parts[index][first : first + stop - start]
        pieces = [self._parts[index][first:]]
        while stop > self._ends[index]:
            index += 1
            part = self._parts[index]
            pieces.append(part[: min(len(part), stop - (self._ends[index] - len(part)))])
        return b"".join(pieces)

    def read1(self, size: int | None = -1) -> Any:
        return self.read(size)


class _Remaining:
    """What :meth:`PartsReader.getbuffer` gives: only a length, in a ``with`` block."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __enter__(self) -> _Remaining:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


async def read_into(content: aiohttp.StreamReader, parts: Sequence[memoryview], length: int) -> int:
    """Copy a response body into ``parts`` as its buffers arrive; the number of bytes read."""
    index, offset, got = 0, 0, 0
    while got < length:
        data = await content.readany()
        if not data:
            break
        view = memoryview(data)
        got += len(view)
        while view:
            while index < len(parts) and offset == len(parts[index]):
                index, offset = index + 1, 0
            if index == len(parts):
                raise CorruptChunk(f"s3 response body is longer than the {length} bytes it announced")
            part = parts[index]
            take = min(len(part) - offset, len(view))
            part[offset : offset + take] = view[:take]
            offset += take
            view = view[take:]
    return got
