"""Where the partial chunks this cache stored are, so that a longer prompt still finds them.

A partial chunk (fewer than ``chunk_size`` tokens: the end of a prompt, or of a prompt and
its answer) is keyed like a full one, by chaining the previous chunk's key with its tokens.
A later prompt that extends those tokens has more tokens in that chunk, so hashing its own
chunk gives a different key. The index remembers, for each chain position (the key of
the chunk before), which partial keys were stored there and how many tokens each covers;
a lookup hashes the prompt's tokens at just those lengths and compares keys, so a match is
exact (the same tokens after the same prefix) and a miss costs no tier call.

The index is a hint kept in memory by the cache that stored the chunks: an entry whose chunk
has since left every tier is dropped when a lookup finds it gone. It is bounded: the oldest
chain positions are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict

from lmplug.core.keys import ChunkKey

ROOT = b""
"""The chain position of a prompt's first chunk (no chunk before it)."""


class PartialIndex:
    """Partial chunk keys by chain position: ``previous key -> {partial key: tokens}``."""

    def __init__(self, max_positions: int = 65536) -> None:
        self._positions: OrderedDict[bytes, dict[ChunkKey, int]] = OrderedDict()
        self._max_positions = max_positions

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._positions.values())

    def at(self, previous: bytes) -> dict[ChunkKey, int]:
        """The partial keys stored after ``previous`` (a copy; empty when there are none)."""
        entries = self._positions.get(previous)
        return dict(entries) if entries else {}

    def add(self, previous: bytes, key: ChunkKey, num_tokens: int) -> None:
        entries = self._positions.get(previous)
        if entries is None:
            entries = self._positions[previous] = {}
            while len(self._positions) > self._max_positions:
                self._positions.popitem(last=False)
        else:
            self._positions.move_to_end(previous)
        entries[key] = num_tokens

    def discard(self, previous: bytes, key: ChunkKey) -> None:
        entries = self._positions.get(previous)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self._positions[previous]
