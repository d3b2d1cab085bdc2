"""Fixed cost per chunk of lookup, store and retrieve, with chunks so small that copying is free.

Geometry: chunk_size 16 tokens, 2 layers, 1 KV head of 8, float16: 1 KiB per chunk. Each op
is timed with many chunks per call (256) and with one chunk per call; the result is
microseconds per chunk. Stores are of chunks the cache does not hold (evicted again outside
the timed section); lookups and retrieves find every chunk; retrieves write into ``out=``.
Same-run references: ``cache.keys()`` per chunk (the hashing every op does) and one torch
``copy_`` of a chunk (the per-chunk copy store and retrieve cannot avoid).

Target: <= 20 us per chunk for every op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import lmplug
from benchmarks.harness import (
    Backend,
    Result,
    Settings,
    Stopwatch,
    Target,
    per_call,
    per_call_async,
    run_per_backend,
    sample_async,
)

NAME = "fixed_cost"
SUMMARY = "us per chunk of lookup/store/retrieve with tiny chunks (target <= 20 us)"

CHUNK_TOKENS = 16
TARGET = Target("<=", 20.0)
CONFIG: dict[str, Any] = {
    "chunk_size": CHUNK_TOKENS,
    "model": {"name": "bench-fixed-cost", "num_layers": 2, "num_kv_heads": 1, "head_size": 8, "dtype": "float16"},
    "tiers": [{"type": "cpu", "capacity": "64MiB"}],
}


async def _measure(cache: lmplug.Cache, chunks: int, settings: Settings, backend: Backend) -> list[Result]:
    num_tokens = chunks * CHUNK_TOKENS
    calls = max(1, (256 if settings.quick else 2048) // chunks)  # chunks per sample, whatever the call size
    layout = cache.layout
    held = np.arange(num_tokens, dtype=np.int32) + 1_000_000 * chunks  # stored once, kept
    fresh = held + 500_000  # stored and evicted again by every store sample
    kv = torch.randn(layout.shape(num_tokens), generator=torch.Generator().manual_seed(chunks)).to(layout.dtype)
    out = torch.zeros_like(kv)
    chunk_out = torch.zeros(layout.shape(CHUNK_TOKENS), dtype=layout.dtype)
    if await cache.store(held, kv) != num_tokens:
        raise RuntimeError("the held prompt did not fit in the pool")

    async def lookup() -> float:
        async def once() -> None:
            if await cache.lookup(held) != num_tokens:
                raise RuntimeError("lookup missed")

        return await per_call_async(once, calls)

    async def store() -> float:
        watch = Stopwatch()
        for _ in range(calls):
            with watch:
                stored = await cache.store(fresh, kv)
            if stored != num_tokens:
                raise RuntimeError(f"store kept {stored} of {num_tokens} tokens")
            await cache.evict(fresh)
        return watch.elapsed / calls

    async def retrieve() -> float:
        async def once() -> None:
            _, found = await cache.retrieve(held, out=out)
            if found != num_tokens:
                raise RuntimeError("retrieve missed")

        return await per_call_async(once, calls)

    async def keys() -> float:
        return per_call(lambda: cache.keys(held), calls)

    async def copy() -> float:
        return per_call(lambda: chunk_out.copy_(kv[:, :, :CHUNK_TOKENS]), calls * chunks)

    stats = await sample_async(
        {"keys": keys, "copy": copy, "lookup": lookup, "store": store, "retrieve": retrieve}, settings
    )
    out.zero_()
    if (await cache.retrieve(held, out=out))[1] != num_tokens or not torch.equal(out, kv):  # untimed check
        raise RuntimeError("retrieve did not return the KV stored")
    per_chunk = {name: value.scaled(1e6 / chunks) for name, value in stats.items()}
    per_chunk["copy"] = stats["copy"].scaled(1e6)  # already per chunk
    label = f"{chunks} chunk{'s' if chunks > 1 else ''}/call [{backend}]"
    unit = "us/chunk"
    return [
        Result(NAME, f"lookup {label}", unit, per_chunk["lookup"], TARGET, per_chunk["keys"], "keys()"),
        Result(NAME, f"store {label}", unit, per_chunk["store"], TARGET, per_chunk["copy"], "copy_"),
        Result(NAME, f"retrieve out= {label}", unit, per_chunk["retrieve"], TARGET, per_chunk["copy"], "copy_"),
    ]


async def _main(settings: Settings, backend: Backend) -> list[Result]:
    results: list[Result] = []
    async with lmplug.open_cache(CONFIG) as cache:
        for chunks in (256, 1):
            results += await _measure(cache, chunks, settings, backend)
    return results


def run(settings: Settings) -> list[Result]:
    return run_per_backend(_main, settings)
