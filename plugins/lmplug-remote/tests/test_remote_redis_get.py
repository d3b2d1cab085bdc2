"""The redis connector's GET path, which reads a value from the socket straight into the caller's parts."""

from __future__ import annotations

import os

import anyio
import pytest
import redis

import lmplug
from lmplug_remote.redis import RedisOptions
from lmplug_remote.redis.connector import RedisConnector

from redis_servers import RedisClusterServers, RedisServer, StallingProxy


@pytest.fixture(params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> RedisServer | RedisClusterServers:
    """A flushed redis-server or Redis Cluster."""
    servers: RedisServer | RedisClusterServers = request.getfixturevalue(
        "redis_server" if request.param == "single" else "redis_cluster"
    )
    servers.flush()
    return servers


async def test_values_of_every_size_land_in_the_parts(store: RedisServer | RedisClusterServers) -> None:
    # Values that end inside the reply's first read, at a part boundary, and far beyond it.
    sizes = [0, 1, 70, 16 * 1024, 100_000, 5 << 20]
    async with RedisConnector(store.url, RedisOptions()) as connector:
        values = {size: os.urandom(size) for size in sizes}
        for size, value in values.items():
            await connector.put(f"lmplug/get/{size}", [memoryview(value)], None)
        for size, value in values.items():
            head, body = bytearray(70), bytearray(max(size, 1) + 10)
            length = await connector.get_into(f"lmplug/get/{size}", [memoryview(head), memoryview(body)])
            assert length == size
            assert bytes(head + body)[:size] == value
            assert bytes(head + body)[size:] == bytes(70 + len(body) - size)  # nothing written past the value


async def test_miss_writes_nothing_and_keeps_the_connection(store: RedisServer | RedisClusterServers) -> None:
    async with RedisConnector(store.url, RedisOptions(max_connections=1)) as connector:
        parts = bytearray(b"\xaa" * 100)
        assert await connector.get_into("lmplug/get/absent", [memoryview(parts)]) is None
        assert parts == b"\xaa" * 100
        await connector.put("lmplug/get/present", [memoryview(b"value")], None)
        assert await connector.get_into("lmplug/get/present", [memoryview(parts)]) == 5
        assert parts[:5] == b"value"


async def test_oversized_value_is_corrupt_and_its_connection_is_not_reused(
    store: RedisServer | RedisClusterServers,
) -> None:
    big, small = os.urandom(3 << 20), os.urandom(1000)
    async with RedisConnector(store.url, RedisOptions(max_connections=1)) as connector:
        await connector.put("lmplug/get/big", [memoryview(big)], None)
        await connector.put("lmplug/get/small", [memoryview(small)], None)
        parts = bytearray(4096)
        with pytest.raises(lmplug.CorruptChunk, match=f"{len(big)} bytes, at most 4096"):
            await connector.get_into("lmplug/get/big", [memoryview(parts)])
        assert parts == bytes(4096)  # not even the value's first bytes
        # The one connection was closed with most of the value unread; the next call gets a fresh one.
        assert await connector.get_into("lmplug/get/small", [memoryview(parts)]) == 1000
        assert parts[:1000] == small
        assert connector.statistics()["failures"] == 0


async def test_value_of_another_type_is_corrupt(store: RedisServer | RedisClusterServers) -> None:
    with store.client() as raw:
        raw.hset("lmplug/get/hash", "field", "value")
    async with RedisConnector(store.url, RedisOptions(max_connections=1)) as connector:
        with pytest.raises(lmplug.CorruptChunk, match="does not hold a string"):
            await connector.get_into("lmplug/get/hash", [memoryview(bytearray(100))])
        await connector.put("lmplug/get/after", [memoryview(b"ok")], None)
        assert await connector.get_into("lmplug/get/after", [memoryview(bytearray(10))]) == 2


async def test_cluster_read_follows_a_moved_slot(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flush()
    value = os.urandom(200_000)
    async with RedisConnector(redis_cluster.url, RedisOptions()) as connector:
        await connector.put("lmplug/get/moved", [memoryview(value)], None)
        client = connector._client
        assert isinstance(client, redis.RedisCluster)
        slot = client.keyslot("lmplug/get/moved")
        owner = client.nodes_manager.slots_cache[slot][0]
        elsewhere = next(node for node in client.get_primaries() if node.name != owner.name)
        client.nodes_manager.slots_cache[slot] = [elsewhere]  # a stale slot table: that node answers MOVED
        parts = bytearray(len(value))
        assert await connector.get_into("lmplug/get/moved", [memoryview(parts)]) == len(value)
        assert parts == value
        assert client.nodes_manager.slots_cache[slot][0].name == owner.name  # the client learnt the move


async def test_cancel_mid_value_never_writes_into_the_parts_afterwards(
    redis_server: RedisServer, stalling_proxy: StallingProxy
) -> None:
    value = os.urandom(4 << 20)
    with redis_server.client() as raw:
        raw.set("lmplug/get/stalled", value)
    async with RedisConnector(stalling_proxy.url, RedisOptions()) as connector:
        await connector.health()
        stalling_proxy.stall_after(1 << 20)  # the reply stops a quarter into the value
        parts = bytearray(b"\xaa" * len(value))
        with anyio.fail_after(10):
            with anyio.move_on_after(0.5) as scope:
                await connector.get_into("lmplug/get/stalled", [memoryview(parts)])
            assert scope.cancelled_caught
            after_cancel = bytes(parts)
            assert after_cancel[: 1 << 19] == value[: 1 << 19]  # the value had begun to arrive
            assert after_cancel[1 << 20 :] == b"\xaa" * (len(value) - (1 << 20))
            stalling_proxy.release()  # the rest of the reply now flows to the shut-down socket
            await anyio.sleep(0.3)
            assert bytes(parts) == after_cancel
            # The cancelled call's connection is gone; the next call reads the whole value.
            assert await connector.get_into("lmplug/get/stalled", [memoryview(parts)]) == len(value)
            assert parts == value
        assert connector.statistics()["cancelled"] == 1
