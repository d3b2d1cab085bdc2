"""The s3:// connector against a real SeaweedFS S3 server: data path, multipart, errors, clean-up."""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import free_port, make_config, reference_kv
from lmplug_remote.s3.connector import S3Connector
from lmplug_remote.s3.options import MiB, S3Options

from remote_testing import remote_tier
from s3_servers import S3_BUCKET, SeaweedS3


def connector(server: SeaweedS3, url: str, **options: Any) -> S3Connector:
    return S3Connector(url, S3Options.model_validate(server.options(**options)))


def object_key(url: str, key: str) -> str:
    return urlsplit(url).path.strip("/") + "/" + key


def remote_config(url: str, server: SeaweedS3, **remote: Any) -> dict[str, Any]:
    return make_config(
        [{"type": "remote", "url": url, "connector": server.options(), **remote}],
        chunk_size=16,
        save_partial_chunks=True,
    )


def prompt(seed: int, tokens: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30_000 for i in range(tokens)]


async def test_values_round_trip_into_split_buffers(s3_server: SeaweedS3, s3_url: str) -> None:
    header, payload = os.urandom(100), os.urandom(300_000)
    async with connector(s3_server, s3_url) as s3:
        assert await s3.get_into("a", [memoryview(bytearray(10))]) is None
        await s3.put("a", [memoryview(header), memoryview(payload)], None)
        await s3.put("b", [memoryview(b"small")], None)
        head, body = bytearray(100), bytearray(400_000)
        assert await s3.get_into("a", [memoryview(head), memoryview(body)]) == 400_100 - 100_000
        assert bytes(head) == header
        assert bytes(body[:300_000]) == payload
        assert await s3.exists(["a", "missing", "b"]) == [True, False, True]
        assert await s3.delete(["a", "b"]) == 2
        assert await s3.exists(["a", "b"]) == [False, False]
        assert s3.statistics()["bytes_received"] == 300_100


async def test_a_value_longer_than_the_buffers_is_corrupt(s3_server: SeaweedS3, s3_url: str) -> None:
    async with connector(s3_server, s3_url) as s3:
        await s3.put("long", [memoryview(bytes(5000))], None)
        with pytest.raises(lmplug.CorruptChunk, match="5000 bytes"):
            await s3.get_into("long", [memoryview(bytearray(100)), memoryview(bytearray(4000))])
        # the connection it used is still fine for the next call
        assert await s3.get_into("long", [memoryview(bytearray(5000))]) == 5000


async def test_large_values_go_up_multipart_and_read_back_identical(s3_server: SeaweedS3, s3_url: str) -> None:
    header, payload = os.urandom(80), os.urandom(12 * MiB + 12345)
    async with connector(s3_server, s3_url, multipart_threshold="8MiB", part_size="5MiB") as s3:
        await s3.put("big", [memoryview(header), memoryview(payload)], None)
        assert s3.statistics()["multipart_puts"] == 1
        client = s3_server.client()
        try:
            described = client.head_object(Bucket=S3_BUCKET, Key=object_key(s3_url, "big"))
        finally:
            client.close()
        assert described["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
        head, body = bytearray(80), bytearray(len(payload))
        assert await s3.get_into("big", [memoryview(head), memoryview(body)]) == 80 + len(payload)
        assert bytes(head) == header
        assert bytes(body) == payload


async def test_bodies_go_out_with_their_headers(s3_server: SeaweedS3, s3_url: str) -> None:
    """No PUT waits for "100 Continue": a round trip saved, and no half-sent request when the server dies."""
    sent: list[tuple[str, str | None]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append((request.method, request.headers.get("Expect")))

    async with connector(s3_server, s3_url, multipart_threshold="5MiB", part_size="5MiB") as s3:
        s3._client.meta.events.register("before-send.s3", record)
        await s3.put("whole", [memoryview(os.urandom(3000))], None)
        await s3.put("parts", [memoryview(os.urandom(6 * MiB))], None)
        assert s3.statistics()["multipart_puts"] == 1
        assert await s3.exists(["whole", "parts"]) == [True, True]
    puts = [expect for method, expect in sent if method == "PUT"]
    assert len(puts) == 3  # one whole object, two parts
    assert puts == [None] * 3


async def test_a_cancelled_multipart_upload_leaves_nothing_behind(s3_server: SeaweedS3, s3_url: str) -> None:
    payload = memoryview(os.urandom(30 * MiB))
    async with connector(s3_server, s3_url, multipart_threshold="5MiB", part_size="5MiB", max_concurrency=2) as s3:
        with anyio.move_on_after(0.05) as scope:
            await s3.put("cancelled", [payload], None)
        assert scope.cancelled_caught
        assert await s3.exists(["cancelled"]) == [False]
    # aclose waited for the abort of the upload
    client = s3_server.client()
    try:
        uploads = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=object_key(s3_url, ""))
    finally:
        client.close()
    assert uploads.get("Uploads", []) == []


async def test_many_keys_are_checked_and_deleted(s3_server: SeaweedS3, s3_url: str) -> None:
    keys = [f"k{i}" for i in range(40)]
    async with connector(s3_server, s3_url, max_concurrency=4) as s3:
        async with anyio.create_task_group() as group:
            for key in keys[::2]:
                group.start_soon(s3.put, key, [memoryview(key.encode())], None)
        assert await s3.exists(keys) == [i % 2 == 0 for i in range(40)]
        await s3.delete(keys)
        assert await s3.exists(keys) == [False] * 40


async def test_a_missing_bucket_is_a_clear_error(s3_server: SeaweedS3) -> None:
    async with connector(s3_server, "s3://lmplug-no-such-bucket/x") as s3:
        for call in (s3.exists(["k"]), s3.get_into("k", [memoryview(bytearray(4))])):
            with pytest.raises(lmplug.TierUnavailable, match=r"bucket 'lmplug-no-such-bucket' does not exist"):
                await call


async def test_a_missing_bucket_is_a_miss_for_the_tier(s3_server: SeaweedS3) -> None:
    config = remote_config("s3://lmplug-no-such-bucket/x", s3_server)
    tokens = prompt(1, 32)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        await remote_tier(cache).drain()
        assert await cache.lookup(tokens) == 0
        assert (await cache.retrieve(tokens))[1] == 0
        assert remote_tier(cache).statistics().errors >= 1


async def test_create_bucket_makes_a_missing_bucket(s3_server: SeaweedS3) -> None:
    bucket = f"lmplug-made-{os.urandom(4).hex()}"
    async with connector(s3_server, f"s3://{bucket}", create_bucket=True) as s3:
        await s3.put("k", [memoryview(b"value")], None)
        out = bytearray(5)
        assert await s3.get_into("k", [memoryview(out)]) == 5
        assert out == b"value"


async def test_an_unreachable_endpoint_names_the_cause() -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group():
            pass
    port = free_port()  # nothing listens here
    options = S3Options(
        endpoint_url=f"http://127.0.0.1:{port}", access_key_id="a", secret_access_key="b", max_attempts=1
    )
    async with S3Connector("s3://lmplug-tests/p", options) as s3:  # connecting is lazy: no error yet
        with pytest.raises(lmplug.TierUnavailable, match=rf"127\.0\.0\.1:{port}.*cannot connect"):
            await s3.exists(["k"])


async def test_bad_urls_and_options_are_config_errors() -> None:
    with pytest.raises(lmplug.ConfigError, match="s3://bucket/prefix"):
        S3Connector("s3:///nobucket", S3Options())
    with pytest.raises(ValueError, match="set together"):
        S3Options(access_key_id="only-the-id")
    with pytest.raises(ValueError, match="greater than or equal"):
        S3Options(part_size="1MiB")


async def test_a_corrupted_object_is_a_miss_and_is_deleted(s3_server: SeaweedS3, s3_url: str) -> None:
    config = remote_config(s3_url, s3_server)
    tokens = prompt(2, 32)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config) as cache:
        tier = remote_tier(cache)
        await cache.store(tokens, kv)
        await tier.drain()
        names = [object_key(s3_url, tier.key_name(key)) for key in cache.keys(tokens)]
        client = s3_server.client()
        try:
            value = bytearray(client.get_object(Bucket=S3_BUCKET, Key=names[1])["Body"].read())
            value[-5] ^= 0x20
            client.put_object(Bucket=S3_BUCKET, Key=names[1], Body=bytes(value))
            got, hit = await cache.retrieve(tokens)
            assert hit == 16  # the good first chunk only
            assert torch.equal(got, kv[:, :, :16])
            with pytest.raises(client.exceptions.ClientError, match=r"404|Not Found"):
                client.head_object(Bucket=S3_BUCKET, Key=names[1])
        finally:
            client.close()
        assert tier.statistics().errors >= 1


async def test_second_cache_hits_what_the_first_stored(s3_server: SeaweedS3, s3_url: str) -> None:
    config = remote_config(s3_url, s3_server)
    tokens = prompt(3, 3 * 16 + 5)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config) as first:
        await first.store(tokens, kv)
        await remote_tier(first).drain()
    async with lmplug.open_cache(config) as second:
        assert await second.lookup(tokens) == len(tokens)
        got, hit = await second.retrieve(tokens)
        assert hit == len(tokens)
        assert torch.equal(got, kv)


async def test_closing_leaves_no_threads(s3_server: SeaweedS3, s3_url: str) -> None:
    before = {thread.ident for thread in threading.enumerate()}
    s3 = connector(s3_server, s3_url)
    await s3.aclose()  # never connected: nothing to do
    async with s3:
        await s3.put("k", [memoryview(b"v")], None)
        with anyio.move_on_after(0):  # cancelled before it could start
            await s3.exists(["k"])
    await s3.aclose()
    lingering = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("lmplug-s3")]
    assert lingering == []
    with pytest.raises(lmplug.TierUnavailable, match="after aclose"):
        await s3.exists(["k"])
