"""The redis connectors against a real redis-server and a real three-node Redis Cluster."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import reference_kv
from lmplug_remote.redis import RedisOptions
from lmplug_remote.redis.connector import RedisConnector

from redis_servers import RedisClusterServers, RedisServer
from remote_testing import remote_tier, two_tier_config

CHUNK = 16


def prompt(seed: int, tokens: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30_000 for i in range(tokens)]


@pytest.fixture(params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> RedisServer | RedisClusterServers:
    """A flushed redis-server or Redis Cluster."""
    servers: RedisServer | RedisClusterServers = request.getfixturevalue(
        "redis_server" if request.param == "single" else "redis_cluster"
    )
    servers.flush()
    return servers


@pytest.fixture
def store_url(store: RedisServer | RedisClusterServers) -> str:
    return store.url


# ---------------------------------------------------------------------------- the connector itself


async def test_parts_round_trip_byte_identical(store_url: str) -> None:
    header = memoryview(os.urandom(100))
    payload = memoryview(bytearray(os.urandom(3 << 20)))
    async with RedisConnector(store_url, RedisOptions()) as connector:
        await connector.put("lmplug/test/a", [header, payload], None)
        await connector.put("lmplug/test/b", [payload[:1000]], None)
        got_header, got_payload = bytearray(100), bytearray(3 << 20)
        length = await connector.get_into("lmplug/test/a", [memoryview(got_header), memoryview(got_payload)])
        assert length == 100 + (3 << 20)
        assert got_header == header
        assert got_payload == payload
        short = bytearray(4096)
        assert await connector.get_into("lmplug/test/b", [memoryview(short)]) == 1000
        assert short[:1000] == payload[:1000]
        assert short[1000:] == bytes(3096)
        assert await connector.get_into("lmplug/test/none", [memoryview(short)]) is None
        stats = connector.statistics()
        assert stats["bytes_written"] == 100 + (3 << 20) + 1000
        assert stats["failures"] == 0


async def test_put_many_pipelines_every_value_to_its_node(store_url: str) -> None:
    """The tier's writers hand a batch to put_many: one pipelined call (per cluster node)."""
    values = [os.urandom(1000 + 997 * i) for i in range(12)]
    entries = [(f"lmplug/test/many/{i}", [memoryview(v[:10]), memoryview(v[10:])]) for i, v in enumerate(values)]
    async with RedisConnector(store_url, RedisOptions()) as connector:
        await connector.put_many(entries, 30.0)
        assert connector.statistics()["calls"] == 1
        for (name, _), value in zip(entries, values, strict=True):
            buffer = bytearray(len(value))
            assert await connector.get_into(name, [memoryview(buffer)]) == len(value)
            assert buffer == value
        assert connector.statistics()["bytes_written"] == sum(map(len, values))
        await connector.put_many([], None)
        assert connector.statistics()["calls"] == 1 + len(values)


async def test_exists_and_delete_span_many_keys(store_url: str) -> None:
    names = [f"lmplug/test/{i}" for i in range(40)]  # spread over every node of a cluster
    async with RedisConnector(store_url, RedisOptions()) as connector:
        for name in names[::2]:
            await connector.put(name, [memoryview(name.encode())], None)
        assert await connector.exists(names) == [i % 2 == 0 for i in range(40)]
        assert await connector.delete(names) == 20
        assert await connector.exists(names) == [False] * 40
        assert await connector.delete([]) == 0
        await connector.health()


async def test_value_larger_than_the_parts_is_corrupt(store_url: str) -> None:
    async with RedisConnector(store_url, RedisOptions()) as connector:
        await connector.put("lmplug/test/big", [memoryview(bytes(5000))], None)
        with pytest.raises(lmplug.CorruptChunk, match="5000 bytes, at most 4096"):
            await connector.get_into("lmplug/test/big", [memoryview(bytearray(4096))])


async def test_ttl_sets_an_expiry(redis_server: RedisServer) -> None:
    async with RedisConnector(redis_server.url, RedisOptions()) as connector:
        await connector.put("lmplug/test/ttl", [memoryview(b"x")], 30.0)
    with redis_server.client() as raw:
        assert 0 < raw.pttl("lmplug/test/ttl") <= 30_000


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://a:1,b:2", {}, "several hosts need redis\\+cluster"),
        ("redis://h:1/2", {"db": 3}, "database 2 in the URL, but db: 3"),
        ("redis://h:1/x", {}, "must be a database number"),
        ("redis://h:1", {"tls": {"verify": False}}, "tls options need a rediss:// URL"),
        ("redis+cluster://h:1/1", {}, "only database 0"),
        ("redis://h:99999", {}, "bad port"),
        ("redis://h:1?db=2", {}, "query and fragment are not used"),
    ],
)
def test_bad_urls_are_config_errors(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(lmplug.ConfigError, match=message):
        RedisConnector(url, RedisOptions.model_validate(options))


def test_credentials_and_database_come_from_url_or_options() -> None:
    connector = RedisConnector("rediss://me:s%40cret@[::1]:7000/3", RedisOptions())
    assert (connector.target.username, connector.target.password, connector.target.db) == ("me", "s@cret", 3)
    assert connector.target.tls
    assert connector.target.where == "[::1]:7000"
    options = RedisOptions.model_validate({"username": "you", "password": "other", "db": 3})
    connector = RedisConnector("redis://me:secret@h/3", options)
    assert (connector.target.username, connector.target.password) == ("you", "other")
    assert RedisConnector("redis+cluster://a,b:7001", RedisOptions()).target.hosts == [("a", 6379), ("b", 7001)]


async def test_unreachable_server_is_unavailable_not_a_hang(redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers()
    server.kill()  # nothing listens on its port now
    options = RedisOptions.model_validate({"connect_timeout": "500ms", "socket_timeout": "500ms"})
    async with RedisConnector(server.url, options) as connector:  # connecting is lazy: not an error
        with anyio.fail_after(10):
            with pytest.raises(
                lmplug.TierUnavailable, match=rf"redis 127.0.0.1:{server.port}: EXISTS failed: .*refused"
            ):
                await connector.exists(["k"])


async def test_cancelled_call_on_a_hung_server_returns_at_once(redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers()
    assert server.process is not None
    payload = memoryview(bytearray(32 << 20))  # more than the socket buffers hold: the send blocks
    async with RedisConnector(server.url, RedisOptions()) as connector:
        await connector.health()
        server.process.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(10):  # a guard against a hang: the calls end after 0.3 s
                with anyio.move_on_after(0.3) as scope:
                    await connector.put("lmplug/test/hung", [payload], None)
                assert scope.cancelled_caught
                with anyio.move_on_after(0.3) as scope:
                    await connector.get_into("lmplug/test/hung", [memoryview(bytearray(10))])
                assert scope.cancelled_caught
                await connector.aclose()  # stops the abandoned calls' threads and closes their sockets
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert connector.statistics()["cancelled"] == 2


# ---------------------------------------------------------------------------- through the tier


async def test_entries_expire_after_the_ttl(redis_server: RedisServer) -> None:
    redis_server.flush()
    config = two_tier_config(redis_server.url, ttl="300ms")
    tokens = prompt(1, 2 * CHUNK)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        tier = remote_tier(cache)
        await tier.drain()
        names = [tier.key_name(key) for key in cache.keys(tokens)]
        with redis_server.client() as raw:
            assert all(0 < raw.pttl(name) <= 300 for name in names)
            await cache.evict(tokens, tiers=["cpu"])
            assert await cache.lookup(tokens) == len(tokens)
            await anyio.sleep(max(raw.pttl(name) for name in names) / 1000 + 0.05)
            assert raw.exists(*names) == 0  # redis expires a key when it is read after its time
        assert await cache.lookup(tokens) == 0
        assert (await cache.retrieve(tokens))[1] == 0


async def test_wrong_password_is_a_clear_error_and_misses(
    redis_servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_servers(password="right-password")
    options = RedisOptions.model_validate({"password": "wrong-password"})
    async with RedisConnector(server.url, options) as connector:
        with pytest.raises(lmplug.TierUnavailable, match=rf"127.0.0.1:{server.port}: .*authentication failed"):
            await connector.exists(["k"])
    config = two_tier_config(server.url, connector={"password": "wrong-password"})
    tokens = prompt(2, 2 * CHUNK)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, kv)
        tier = remote_tier(cache)
        await tier.drain()
        got, hit = await cache.retrieve(tokens)  # the engine keeps serving from L1
        assert hit == len(tokens)
        assert torch.equal(got, kv)
        await cache.evict(tokens, tiers=["cpu"])
        assert await cache.lookup(tokens) == 0
        assert tier.statistics().errors >= 1
        assert tier.statistics().stored == 0
    assert "authentication failed" in caplog.text
    right = two_tier_config(f"redis://:right-password@{server.address}")
    async with lmplug.open_cache(right) as cache:
        await cache.store(tokens, kv)
        await remote_tier(cache).drain()
        await cache.evict(tokens, tiers=["cpu"])
        got, hit = await cache.retrieve(tokens)
        assert hit == len(tokens)
        assert torch.equal(got, kv)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_corrupted_value_is_a_miss_and_is_deleted(store: RedisServer | RedisClusterServers, damage: str) -> None:
    config = two_tier_config(store.url)
    tokens = prompt(3, 2 * CHUNK)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, kv)
        tier = remote_tier(cache)
        await tier.drain()
        names = [tier.key_name(key) for key in cache.keys(tokens)]
        with store.client() as raw:
            value = raw.get(names[1])
            assert isinstance(value, bytes)
            raw.set(names[1], b"garbage" if damage == "garbage" else value[: len(value) // 2])
            await cache.evict(tokens, tiers=["cpu"])
            got, hit = await cache.retrieve(tokens)
            assert hit == CHUNK  # the first chunk is good, the second is never served
            assert torch.equal(got, kv[:, :, :CHUNK])
            assert raw.exists(names[1]) == 0
            assert raw.exists(names[0]) == 1
        assert tier.statistics().errors >= 1
