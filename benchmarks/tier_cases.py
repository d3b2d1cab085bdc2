"""Pieces the tier throughput benchmarks share: the prompt geometry and the timed cases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import numpy as np
import torch

import lmplug
from benchmarks.harness import MiB, Stopwatch
from lmplug import tierkit

CHUNK_TOKENS = 256
KV_HEADS = 8
HEAD_SIZE = 128
Case = Callable[[], Awaitable[float]]
POISON = 0xFF
"""Written over every read's destination before the read: 0xFFFF is a bfloat16 NaN, equal to
nothing, so a value the read left alone fails the comparison after it."""
TierT = TypeVar("TierT", bound=tierkit.Tier)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One sample's prompt: ``chunks`` chunks of ``chunk_mib`` MiB (256 tokens, bf16, 8x128 hidden)."""

    chunk_mib: int
    chunks: int

    @classmethod
    def moving(cls, chunk_mib: int, sample_bytes: int) -> Prompt:
        """As many chunks as ``sample_bytes`` holds (at least one)."""
        return cls(chunk_mib, max(1, sample_bytes // (chunk_mib * MiB)))

    @property
    def num_layers(self) -> int:
        return self.chunk_mib  # 2 (K, V) * layers * 256 tokens * 1024 hidden * 2 bytes = layers MiB

    @property
    def num_tokens(self) -> int:
        return self.chunks * CHUNK_TOKENS

    @property
    def nbytes(self) -> int:
        return self.chunks * self.chunk_mib * MiB

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.num_layers, self.num_tokens, KV_HEADS * HEAD_SIZE)

    def model(self) -> dict[str, object]:
        """The ``model`` section of a config with this geometry."""
        return {
            "name": "bench",
            "num_layers": self.num_layers,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": "bfloat16",
        }


def only_tier(cache: lmplug.Cache, kind: type[TierT]) -> TierT:
    """The single tier of a one-tier benchmark stack, checked to be a ``kind``."""
    tier = cache.pipeline.slots[0].tier
    if not isinstance(tier, kind):
        raise RuntimeError(f"expected the {kind.__name__}, got {type(tier).__name__}")
    return tier


def store_case(cache: lmplug.Cache, tier: tierkit.Tier, tokens: np.ndarray, kv: torch.Tensor) -> Case:
    """Store ``kv`` and wait until the tier has written it; evicted again (untimed) for the next sample."""
    num_tokens = int(kv.shape[2])

    async def store() -> float:
        watch = Stopwatch()
        with watch:
            count = await cache.store(tokens, kv)
            await tier.drain()
        if count != num_tokens:
            raise RuntimeError(f"store kept {count} of {num_tokens} tokens")
        await cache.evict(tokens)
        return watch.elapsed

    return store


def retrieve_case(
    cache: lmplug.Cache,
    tokens: np.ndarray,
    out: torch.Tensor,
    before: Callable[[], Awaitable[object]] | None = None,
) -> Case:
    """Retrieve every token of ``tokens`` into ``out``; ``before`` runs untimed first (e.g. drop caches)."""
    num_tokens = int(out.shape[2])

    async def retrieve() -> float:
        if before is not None:
            await before()
        watch = Stopwatch()
        with watch:
            _, found = await cache.retrieve(tokens, out=out)
        if found != num_tokens:
            raise RuntimeError(f"retrieve found {found} of {num_tokens} tokens")
        return watch.elapsed

    return retrieve


def checked(retrieve: Case, out: torch.Tensor, kv: torch.Tensor) -> Case:
    """``retrieve`` (into ``out``), with ``out`` overwritten before it and compared with ``kv`` after it, untimed."""

    async def case() -> float:
        out.view(torch.uint8).fill_(POISON)
        elapsed = await retrieve()
        if not torch.equal(out, kv):
            raise RuntimeError("retrieve returned other bytes than were stored")
        return elapsed

    return case


def write_groups(count: int, writers: int, batch: int) -> list[range]:
    """Chunks ``0..count`` cut into contiguous groups of at most ``batch``, at least ``writers`` of
    them where there are that many chunks: the batches a write-behind tier's ``writers`` (each
    taking up to ``batch`` queued chunks) can write at once, evenly filled."""
    groups = min(count, max(writers, -(-count // batch)))
    return [range(count * index // groups, count * (index + 1) // groups) for index in range(groups)]


def thread_case(function: Callable[[], float]) -> Case:
    """A blocking reference that times itself, run in a worker thread."""

    async def case() -> float:
        return await anyio.to_thread.run_sync(function)

    return case


def timed(function: Callable[[], Awaitable[object]]) -> Case:
    """An async reference, timed around the call."""

    async def case() -> float:
        watch = Stopwatch()
        with watch:
            await function()
        return watch.elapsed

    return case
