"""L1 (``type: cpu``) store and retrieve throughput against a same-run memcpy.

Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk
is ``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). Each call
moves a multi-chunk prompt (8 chunks). The pool holds every chunk, so nothing is evicted
behind our back; stores are of chunks the cache does not hold (the stored tokens are
evicted after each store, outside the timed section). Retrieves write into a preallocated
``out=`` tensor, like the reference, which is ``dst.copy_(src)`` between preallocated
contiguous tensors of the same total size. Also reported, for the split: ``numpy.copyto``
of the same bytes, and the floor of a chunked store: one ``copy_`` per chunk from the
source's slice into a contiguous chunk-sized buffer, with no cache around it. Each sample
rotates over enough prompts (own source, destination and pool chunks) to move 128 MiB, so
that every copy, the reference's too, runs from and to DRAM rather than the CPU cache.

Target: store and retrieve each at >= 0.8x the torch memcpy.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import lmplug
from benchmarks.harness import Backend, GiB, MiB, Result, Settings, Stopwatch, Target, run_per_backend, sample_async

NAME = "cpu_throughput"
SUMMARY = "L1 store/retrieve GiB/s vs same-run memcpy (target >= 0.8x)"

CHUNK_TOKENS = 256
KV_HEADS = 8
HEAD_SIZE = 128
TARGET = Target(">=", 0.8, relative=True)
WORKING_SET = 128 * MiB  # bytes moved per sample, >= 4x a 32 MiB last-level cache
WORKING_SET_QUICK = 32 * MiB


def _config(num_layers: int, capacity: int) -> dict[str, Any]:
    return {
        "chunk_size": CHUNK_TOKENS,
        "model": {
            "name": "bench-throughput",
            "num_layers": num_layers,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": "bfloat16",
        },
        "tiers": [{"type": "cpu", "capacity": capacity}],
    }


async def _measure_size(chunk_mib: int, chunks_per_call: int, settings: Settings, backend: Backend) -> list[Result]:
    num_layers = chunk_mib  # 2 (K, V) * layers * 256 tokens * 1024 hidden * 2 bytes = layers MiB
    num_tokens = chunks_per_call * CHUNK_TOKENS
    chunk_bytes = chunk_mib * MiB
    call_bytes = chunks_per_call * chunk_bytes
    # Rotate over enough prompts (each with its own source, destination and pool chunks) that one
    # sample moves WORKING_SET bytes: every copy, the reference's included, then runs from and to
    # DRAM, as it does under an engine, instead of from the CPU cache for the small sizes only.
    prompts = max(1, -(-(WORKING_SET_QUICK if settings.quick else WORKING_SET) // call_bytes))
    shape = (2, num_layers, num_tokens, KV_HEADS * HEAD_SIZE)
    # Random values, written (reading never-touched pages would read the shared zero page), so a
    # retrieve that moved nothing, or the wrong chunk, cannot pass the check below; the memcpy
    # reference copies into destinations of its own, never into the retrieve's.
    generator = torch.Generator().manual_seed(chunk_mib)
    sources = [torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in range(prompts)]
    outs = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(prompts)]
    copies = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(prompts)]
    pairs = list(zip(copies, sources, strict=True))
    byte_pairs = [(out.view(torch.uint8).numpy(), kv.view(torch.uint8).numpy()) for out, kv in pairs]
    # The copies a chunked store cannot avoid, without the cache: each chunk's slice of the source
    # into its own contiguous chunk-sized buffer (carved from `outs`, as the pool carves its buffer).
    chunk_pairs = [
        [
            (chunk, kv[:, :, index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS])
            for index, chunk in enumerate(out.view(chunks_per_call, 2, num_layers, CHUNK_TOKENS, -1).unbind(0))
        ]
        for out, kv in pairs
    ]
    if sources[0].nbytes != call_bytes:
        raise RuntimeError(f"geometry error: a call moves {sources[0].nbytes} bytes, expected {call_bytes}")

    # Disjoint prompts: `stored` are stored by every store sample (and evicted after it, untimed);
    # `held` are stored once and retrieved by every retrieve sample.
    stored = [np.arange(num_tokens, dtype=np.int32) + index * num_tokens for index in range(prompts)]
    held = [tokens + prompts * num_tokens for tokens in stored]
    capacity = (2 * prompts * chunks_per_call + 1) * chunk_bytes

    async with lmplug.open_cache(_config(num_layers, capacity)) as cache:
        for tokens, kv in zip(held, sources, strict=True):
            if await cache.store(tokens, kv) != num_tokens:
                raise RuntimeError("the retrieve prompts did not fit in the pool")

        async def store() -> float:
            watch = Stopwatch()
            for tokens, kv in zip(stored, sources, strict=True):
                with watch:
                    count = await cache.store(tokens, kv)
                if count != num_tokens:
                    raise RuntimeError(f"store kept {count} of {num_tokens} tokens")
            for tokens in stored:
                await cache.evict(tokens)
            return watch.elapsed / prompts

        async def retrieve() -> float:
            watch = Stopwatch()
            for tokens, out in zip(held, outs, strict=True):
                with watch:
                    _, found = await cache.retrieve(tokens, out=out)
                if found != num_tokens:
                    raise RuntimeError(f"retrieve found {found} of {num_tokens} tokens")
            return watch.elapsed / prompts

        async def torch_copy() -> float:
            start = time.perf_counter()
            for out, kv in pairs:
                out.copy_(kv)
            return (time.perf_counter() - start) / prompts

        async def chunked_copy() -> float:
            start = time.perf_counter()
            for pieces in chunk_pairs:
                for destination, source in pieces:
                    destination.copy_(source)
            return (time.perf_counter() - start) / prompts

        async def numpy_copy() -> float:
            start = time.perf_counter()
            for out_bytes, kv_bytes in byte_pairs:
                np.copyto(out_bytes, kv_bytes)
            return (time.perf_counter() - start) / prompts

        stats = await sample_async(
            {"memcpy": torch_copy, "store": store, "retrieve": retrieve, "chunked": chunked_copy, "copyto": numpy_copy},
            settings,
        )
        evictions = sum(tier.evictions for tier in cache.statistics().tiers)
        for out in outs:
            out.zero_()
        await retrieve()  # untimed: every retrieve must have written exactly its prompt's KV
        for index, (out, kv) in enumerate(zip(outs, sources, strict=True)):
            if not torch.equal(out, kv):
                raise RuntimeError(f"retrieve of prompt {index} did not return the KV stored for it")

    # Only our own evict() calls may have evicted: (warmup + repeats) rounds of `prompts` stores.
    expected = (settings.warmup + settings.repeats) * prompts * chunks_per_call
    if evictions != expected:
        raise RuntimeError(f"the pool evicted {evictions - expected} chunks on its own; raise its capacity")

    to_gibs = call_bytes / GiB
    memcpy = stats["memcpy"].inverted(to_gibs)
    label = f"{chunk_mib} MiB x{chunks_per_call} [{backend}]"
    return [
        Result(NAME, f"store {label}", "GiB/s", stats["store"].inverted(to_gibs), TARGET, memcpy, "memcpy"),
        Result(NAME, f"retrieve out= {label}", "GiB/s", stats["retrieve"].inverted(to_gibs), TARGET, memcpy, "memcpy"),
        Result(
            NAME, f"chunked copy_ (floor) {label}", "GiB/s", stats["chunked"].inverted(to_gibs), None, memcpy, "memcpy"
        ),
        Result(NAME, f"numpy.copyto {label}", "GiB/s", stats["copyto"].inverted(to_gibs), None, memcpy, "memcpy"),
    ]


async def _main(settings: Settings, backend: Backend) -> list[Result]:
    sizes = (2, 8) if settings.quick else (2, 8, 32)
    chunks_per_call = 4 if settings.quick else 8
    results: list[Result] = []
    for chunk_mib in sizes:
        results += await _measure_size(chunk_mib, chunks_per_call, settings, backend)
    return results


def run(settings: Settings) -> list[Result]:
    return run_per_backend(_main, settings)
