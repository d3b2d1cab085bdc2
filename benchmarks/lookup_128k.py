"""Lookup of a 128k-token prompt (keys + contains) whose 512 chunks of 256 tokens are all in L1.

The tokens come as a numpy int32 array, as torch tensors (int64, what tokenizers return,
and int32), and as a Python list (what vLLM hands over). The split is shown by same-run
references: key computation alone (``cache.keys`` on the int32 array), contains alone on
precomputed keys, and the ``numpy.asarray(list)`` conversion a list goes through. Two
candidates are timed for comparison: keys under ``hash_algorithm: xxh3_128`` (the default is
blake3) and ``numpy.fromiter(list, int64, count)`` as the list conversion.

Target: <= 5 ms per lookup, whatever the token container.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import numpy as np
import torch

import lmplug
from benchmarks.harness import AsyncSample, Backend, Result, Settings, Target, per_call, per_call_async, sample_async
from lmplug.core.keys import KeyMaker

NAME = "lookup_128k"
SUMMARY = "lookup of a 128k-token prompt, array/tensor/list (target <= 5 ms)"

NUM_TOKENS = 128 * 1024
CHUNK_TOKENS = 256
TARGET = Target("<=", 5.0)
CONFIG: dict[str, Any] = {
    "chunk_size": CHUNK_TOKENS,
    # 8 KiB per chunk: the whole prompt is 4 MiB of KV.
    "model": {"name": "bench-lookup", "num_layers": 1, "num_kv_heads": 1, "head_size": 8, "dtype": "float16"},
    "tiers": [{"type": "cpu", "capacity": "64MiB"}],
}


async def _main(settings: Settings, backend: Backend) -> list[Result]:
    calls = 2 if settings.quick else 5
    rng = np.random.default_rng(0)
    array = rng.integers(0, 150_000, NUM_TOKENS, dtype=np.int32)  # vocabulary-sized ids
    as_list: list[int] = array.tolist()
    containers: dict[str, object] = {
        "numpy int32": array,
        "torch int64": torch.from_numpy(array.astype(np.int64)),
        "torch int32": torch.from_numpy(array.copy()),
        "list": as_list,
    }

    async with lmplug.open_cache(CONFIG) as cache:
        layout = cache.layout
        kv = torch.ones(layout.shape(NUM_TOKENS), dtype=layout.dtype)
        if await cache.store(array, kv) != NUM_TOKENS:
            raise RuntimeError("the prompt did not fit in the pool")
        keys = cache.keys(array)
        xxh3_keymaker = KeyMaker(lmplug.load_config({**CONFIG, "hash_algorithm": "xxh3_128"}))

        def lookup_case(tokens: object) -> AsyncSample:
            async def once() -> None:
                if await cache.lookup(tokens) != NUM_TOKENS:
                    raise RuntimeError("lookup missed")

            async def case() -> float:
                return await per_call_async(once, calls)

            return case

        async def keys_alone() -> float:
            return per_call(lambda: cache.keys(array), calls)

        async def contains_alone() -> float:
            async def once() -> None:
                if await cache.pipeline.contains(keys) != len(keys):
                    raise RuntimeError("contains missed")

            return await per_call_async(once, calls)

        async def asarray() -> float:
            return per_call(lambda: np.asarray(as_list), calls)

        async def fromiter() -> float:
            return per_call(lambda: np.fromiter(as_list, dtype=np.int64, count=len(as_list)), calls)

        async def keys_xxh3() -> float:
            return per_call(lambda: xxh3_keymaker.keys(array), calls)

        cases = {name: lookup_case(tokens) for name, tokens in containers.items()}
        cases |= {
            "keys": keys_alone,
            "keys_xxh3": keys_xxh3,
            "contains": contains_alone,
            "asarray": asarray,
            "fromiter": fromiter,
        }
        stats = {name: value.scaled(1e3) for name, value in (await sample_async(cases, settings)).items()}

    tag = f"[{backend}]"
    results = [
        Result(NAME, f"lookup {name} {tag}", "ms", stats[name], TARGET, stats["keys"], "keys()") for name in containers
    ]
    results += [
        Result(NAME, f"keys() alone, numpy int32 {tag}", "ms", stats["keys"]),
        Result(NAME, f"contains alone, {len(keys)} keys {tag}", "ms", stats["contains"]),
        Result(NAME, f"numpy.asarray(list) alone {tag}", "ms", stats["asarray"]),
        Result(
            NAME,
            f"keys() alone, hash_algorithm xxh3_128 {tag}",
            "ms",
            stats["keys_xxh3"],
            None,
            stats["keys"],
            "blake3",
        ),
        Result(
            NAME, f"numpy.fromiter(list, int64) alone {tag}", "ms", stats["fromiter"], None, stats["asarray"], "asarray"
        ),
    ]
    return results


def run(settings: Settings) -> list[Result]:
    # Lookups are synchronous work under an await; one backend says all (the first requested).
    backend = settings.backends[0]
    return anyio.run(functools.partial(_main, settings, backend), backend=backend)
