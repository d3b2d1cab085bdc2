"""lmplug-server's store: capacity and LRU eviction, TTLs, reservations, disk spill and read-back.

The store is tested directly, then through a server running in the test's own event loop
(asyncio and trio) and a plain protocol client.
"""

from __future__ import annotations

import contextlib
import urllib.request
from pathlib import Path

import anyio

from lmplug_server.protocol import ItemStatus, Op
from lmplug_server.server import LmServer, ServerConfig
from lmplug_server.store import DiskStore, KVStore
from lmplug_server.testing import WireClient, serving


async def put(store: KVStore, key: bytes, value: bytes, ttl: float | None = None) -> bool:
    if not await store.reserve(len(value)):
        return False
    await store.commit(key, bytearray(value), ttl, len(value))
    return True


def value(index: int, size: int) -> bytes:
    return bytes((index * 7 + i) % 251 for i in range(size))


async def test_least_recently_used_values_are_evicted_first() -> None:
    store = KVStore(capacity=100)
    for key in (b"a", b"b", b"c"):
        assert await put(store, key, value(key[0], 30))
    assert await store.get(b"a") == value(ord("a"), 30)  # a is now the most recently used
    assert await put(store, b"d", value(ord("d"), 30))
    assert store.exists([b"a", b"b", b"c", b"d"]) == [True, False, True, True]
    assert store.used == 90 <= store.capacity
    assert store.counters.evictions == 1


async def test_a_value_larger_than_the_capacity_is_refused_and_nothing_is_evicted() -> None:
    store = KVStore(capacity=100)
    assert await put(store, b"a", b"x" * 60)
    assert not await put(store, b"big", b"y" * 101)
    assert store.exists([b"a", b"big"]) == [True, False]
    assert store.counters.refused == 1


async def test_overwriting_replaces_the_value_and_its_accounting() -> None:
    store = KVStore(capacity=100)
    assert await put(store, b"a", b"x" * 30)
    assert await put(store, b"a", b"y" * 50)
    assert await store.get(b"a") == b"y" * 50
    assert (store.used, len(store)) == (50, 1)


async def test_values_expire_after_their_ttl() -> None:
    now = [1000.0]
    store = KVStore(capacity=100, clock=lambda: now[0])
    assert await put(store, b"a", b"x", ttl=5.0)
    assert await put(store, b"b", b"y")
    now[0] += 5.0
    assert store.exists([b"a", b"b"]) == [False, True]
    assert await store.get(b"a") is None
    assert store.used == 1


async def test_delete_reports_what_existed() -> None:
    store = KVStore(capacity=100)
    assert await put(store, b"a", b"x")
    assert await store.delete([b"a", b"missing"]) == [True, False]
    assert (store.used, len(store)) == (0, 0)


async def test_writers_wait_while_reservations_fill_the_capacity() -> None:
    store = KVStore(capacity=100)
    assert await store.reserve(60)
    done: list[str] = []

    async def second() -> None:
        assert await store.reserve(60)
        done.append("reserved")

    async with anyio.create_task_group() as group:
        group.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert done == []  # 60 + 60 > 100: it waits
        store.release(60)
    assert done == ["reserved"]
    assert store.reserved == 60


POOLED = 64 << 10  # smallest buffer the store keeps for reuse


async def put_received(store: KVStore, key: bytes, data: bytes) -> bytearray:
    """What the server does for a PUT: reserve, receive into the store's buffer, commit."""
    assert await store.reserve(len(data))
    buffer = store.buffer(len(data))
    buffer[:] = data
    await store.commit(key, buffer, None, len(data))
    return buffer


async def test_a_dropped_values_buffer_receives_the_next_value_of_its_size() -> None:
    store = KVStore(capacity=4 * POOLED)
    first = await put_received(store, b"a", b"x" * POOLED)
    del first
    assert await store.delete([b"a"]) == [True]
    assert store.free == POOLED
    second = await put_received(store, b"b", b"y" * POOLED)
    assert store.counters.reused == 1
    assert (store.free, store.used) == (0, POOLED)
    assert await store.get(b"b") == b"y" * POOLED
    assert second is await store.get(b"b")


async def test_a_buffer_a_reader_still_holds_is_never_rewritten() -> None:
    store = KVStore(capacity=4 * POOLED)
    await put_received(store, b"a", b"x" * POOLED)
    sending = await store.get(b"a")  # as a GET reply being sent
    assert sending is not None
    view = memoryview(sending)
    await put_received(store, b"a", b"y" * POOLED)  # replaced while it is read
    assert await store.delete([b"a"]) == [True]
    await put_received(store, b"c", b"z" * POOLED)
    assert view == b"x" * POOLED
    assert await store.get(b"c") == b"z" * POOLED


async def test_free_buffers_count_against_the_capacity() -> None:
    store = KVStore(capacity=4 * POOLED)
    for index in range(4):
        await put_received(store, b"k%d" % index, bytes([index]) * POOLED)
    await store.delete([b"k%d" % index for index in range(4)])
    assert (store.used, store.free) == (0, 4 * POOLED)
    await put_received(store, b"big", b"b" * (3 * POOLED))  # another size: free buffers make way
    assert store.used + store.reserved + store.free <= store.capacity
    assert store.free == POOLED
    assert await store.get(b"big") == b"b" * (3 * POOLED)


async def test_a_failed_receive_gives_its_buffer_back() -> None:
    store = KVStore(capacity=4 * POOLED)
    assert await store.reserve(POOLED)
    store.release(POOLED, store.buffer(POOLED))
    assert (store.reserved, store.free) == (0, POOLED)
    await put_received(store, b"a", b"a" * POOLED)
    assert store.counters.reused == 1


async def test_evicted_values_spill_to_disk_and_read_back_identical(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, capacity=10_000)
    store = KVStore(capacity=100, disk=disk)
    for index in range(10):
        assert await put(store, b"k%d" % index, value(index, 40))
    assert store.used <= 100
    assert len(disk) == 8
    assert store.counters.spilled == 8
    for index in range(10):
        assert await store.get(b"k%d" % index) == value(index, 40)
    assert store.counters.disk_hits == 8
    assert all(store.exists([b"k%d" % index for index in range(10)]))
    assert await store.delete([b"k0"]) == [True]
    assert b"k0" not in disk
    assert not store.exists([b"k0"])[0]
    assert len(list(tmp_path.glob("*.lmkv"))) == 7


async def test_a_new_value_hides_the_spilled_one(tmp_path: Path) -> None:
    store = KVStore(capacity=50, disk=DiskStore(tmp_path, capacity=10_000))
    assert await put(store, b"a", b"old" * 10)
    assert await put(store, b"b", b"x" * 30)  # evicts a to disk
    assert b"a" in store.disk  # type: ignore[operator]
    assert await put(store, b"a", b"new" * 5)
    assert await store.get(b"a") == b"new" * 5
    await store.delete([b"a"])
    assert await store.get(b"a") is None  # the old spilled value did not come back


async def test_the_disk_store_evicts_its_own_least_recently_used_files(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, capacity=3 * (40 + 30))  # three spill files (header + key + value)
    store = KVStore(capacity=40, disk=disk)
    for index in range(6):
        assert await put(store, b"k%d" % index, value(index, 40))
    assert disk.used <= disk.capacity
    assert store.exists([b"k%d" % index for index in range(6)]) == [False, False, True, True, True, True]
    assert len(list(tmp_path.glob("*.lmkv"))) == len(disk) == 3


async def test_the_disk_store_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "stale.lmkv").write_bytes(b"left by an earlier run")
    disk = DiskStore(tmp_path, capacity=1000)
    assert len(disk) == 0
    assert not list(tmp_path.glob("*.lmkv"))


# ---------------------------------------------------------------------------- through a server


def client(server: LmServer) -> contextlib.AbstractAsyncContextManager[WireClient]:
    assert server.address is not None
    return WireClient.connect(server.address[1])


async def test_lru_eviction_and_capacity_over_the_wire() -> None:
    async with serving(ServerConfig(port=0, capacity=1 << 20)) as server, client(server) as wire:
        chunk = 256 << 10
        for index in range(6):
            assert await wire.put(f"k{index}", value(index, chunk)) is ItemStatus.OK
            if index == 2:
                assert await wire.get("k0") == value(0, chunk)  # keep k0 recently used
        assert await wire.exists([f"k{index}" for index in range(6)]) == [True, False, False, True, True, True]
        stats = await wire.stats()
        assert stats["memory"]["used"] <= stats["memory"]["capacity"] == 1 << 20
        assert stats["evictions"] == 2
        assert stats["reused_buffers"] == 2  # the evicted values' buffers received the next values
        assert await wire.put("huge", bytes((1 << 20) + 1)) is ItemStatus.NO_SPACE
        assert await wire.exists(["k5"]) == [True]  # the refusal left the connection and the data alone


async def test_disk_spill_is_read_back_over_the_wire(tmp_path: Path) -> None:
    config = ServerConfig(port=0, capacity=1 << 20, disk_path=tmp_path, disk_capacity=16 << 20)
    async with serving(config) as server, client(server) as wire:
        chunk = 300_000
        for index in range(10):
            assert await wire.put(f"k{index}", value(index, chunk)) is ItemStatus.OK
        for index in range(10):
            assert await wire.get(f"k{index}") == value(index, chunk)
        stats = await wire.stats()
        assert stats["disk_hits"] >= 7
        assert stats["disk"]["items"] >= 7


async def test_ttl_and_batched_requests_over_the_wire() -> None:
    async with serving(ServerConfig(port=0, capacity=1 << 20)) as server, client(server) as wire:
        entries = [(f"b{index}", value(index, 1000 + index)) for index in range(20)]
        assert await wire.put_many(entries) == [ItemStatus.OK] * 20
        assert await wire.put("short-lived", b"x", ttl_ms=50) is ItemStatus.OK
        found = await wire.get_many([f"b{index}" for index in range(20)] + ["absent"])
        assert found == [value(index, 1000 + index) for index in range(20)] + [None]
        await anyio.sleep(0.1)  # the TTL's own clock: nothing to wait for but time
        assert await wire.exists(["short-lived", "b0"]) == [False, True]
        assert await wire.delete([f"b{index}" for index in range(20)] + ["absent"]) == 20


async def test_a_get_longer_than_the_client_accepts_is_too_large_with_its_length() -> None:
    async with serving(ServerConfig(port=0, capacity=1 << 20)) as server, client(server) as wire:
        await wire.put("long", bytes(5000))
        replies, data = await wire.keyed(Op.GET, ["long"], (), [1000])
        assert [(reply.status, reply.length) for reply in replies] == [(ItemStatus.TOO_LARGE, 5000)]
        assert data == b""


async def test_metrics_endpoint_counts_operations() -> None:
    async with serving(ServerConfig(port=0, capacity=1 << 20, metrics_port=0)) as server, client(server) as wire:
        await wire.put("m", b"abc")
        assert await wire.get("m") == b"abc"
        assert await wire.get("nothing") is None
        assert server.metrics_address is not None
        url = f"http://127.0.0.1:{server.metrics_address[1]}/metrics"
        text = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        assert 'lmplug_server_requests_total{op="PUT"} 1.0' in text
        assert "lmplug_server_hits_total 1.0" in text
        assert "lmplug_server_misses_total 1.0" in text
        assert 'lmplug_server_bytes_total{direction="in"} 3.0' in text
        assert "lmplug_server_open_connections 1.0" in text
