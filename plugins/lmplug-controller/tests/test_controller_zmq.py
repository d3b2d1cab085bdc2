"""Controller and worker clients over ZeroMQ in one event loop (asyncio and trio)."""

from __future__ import annotations

import time

import anyio
import pytest
import zmq

from lmplug_controller import PROTOCOL_VERSION
from lmplug_controller.protocol import Holder, Kind, decode, encode
from lmplug_controller.testing import MemoryWorker, eventually, make_keys, running_controller, running_worker
from lmplug_controller.zmqio import Channel

KEYS = make_keys("prompt", 12)


async def test_workers_register_report_chunks_and_find_each_others_prefixes() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "a")) as a, running_worker(MemoryWorker(url, "b")) as b:
            a.admit("cpu", KEYS[:4])
            b.admit("disk", KEYS[:9])
            index = controller.index
            await eventually(lambda: index.entries() == 13)
            assert await a.client.lookup(KEYS) == [Holder("b", "disk", "127.0.0.1:7000/b", 9)]
            assert await b.client.lookup(KEYS) == [Holder("a", "cpu", "127.0.0.1:7000/a", 4)]
            b.evict("disk", KEYS[5:6])
            await eventually(lambda: index.entries() == 12)
            assert (await a.client.lookup(KEYS))[0].chunks == 5
            assert await a.client.lookup(make_keys("other", 3)) == []
            stats = a.client.statistics()
            assert stats["lookups"] == 3
            assert stats["lookup_hits"] == 2
            assert stats["lookup_failures"] == 0
            assert stats["events_sent"] == 4
            assert stats["connected"] == 1


async def test_many_events_arrive_in_order_in_batches() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "a")) as a:
            keys = make_keys("long", 5000)
            for start in range(0, len(keys), 100):
                a.admit("cpu", keys[start : start + 100])
                a.evict("cpu", keys[start : start + 10])
                a.admit("disk", keys[start : start + 10])
                if start % 1000 == 0:
                    await anyio.sleep(0.06)  # let a timed flush go
            worker = controller.index.find("a", b"fp-test0")
            assert worker is not None
            await eventually(lambda: controller.index.chunks(worker) == {"cpu": 4500, "disk": 500})
            assert not worker.dirty
            assert controller.counters.gaps == 0
            assert 5 <= a.client.statistics()["event_batches"] <= 10


async def test_a_lost_batch_makes_the_worker_send_a_snapshot() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "a")) as a:
            a.admit("cpu", KEYS[:3])
            await eventually(lambda: len(controller.index) == 3)
            a.held["cpu"].update(KEYS[3:6])  # these events are "lost": the client skips a number
            a.client._seq += 1
            a.admit("disk", KEYS[:1])
            await eventually(lambda: controller.counters.snapshots == 2)
            worker = controller.index.find("a", b"fp-test0")
            assert worker is not None
            await eventually(lambda: not worker.dirty)
            assert controller.counters.gaps == 1
            assert controller.index.chunks(worker) == {"cpu": 6, "disk": 1}


async def test_the_controller_restarts_and_the_worker_registers_and_resyncs() -> None:
    async with anyio.create_task_group() as group:
        async with running_controller() as first:
            port = first.addresses.port  # type: ignore[union-attr]
            url = first.addresses.url  # type: ignore[union-attr]
            worker = MemoryWorker(url, "a")
            await group.start(worker.client.run)
            with anyio.fail_after(5):
                await worker.client.wait_connected()
            worker.admit("cpu", KEYS)
            await eventually(lambda: len(first.index) == len(KEYS))
        worker.admit("disk", KEYS[:2])  # while the controller is down
        async with running_controller(port=port) as second:
            await eventually(lambda: worker.client.statistics()["reconnects"] == 1)
            record = second.index.find("a", b"fp-test0")
            await eventually(lambda: record is not None and not record.dirty)
            assert record is not None
            assert second.index.chunks(record) == {"cpu": len(KEYS), "disk": 2}
            async with running_worker(MemoryWorker(url, "b")) as b:
                assert (await b.client.lookup(KEYS))[0] == Holder("a", "cpu", "127.0.0.1:7000/a", len(KEYS))
        group.cancel_scope.cancel()


async def test_with_no_controller_lookups_are_misses_and_run_keeps_trying() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
    worker = MemoryWorker(url, "a")
    async with running_worker(worker, registered=False):
        await anyio.sleep(0.2)
        assert not worker.client.connected
        assert await worker.client.lookup(KEYS) == []
        worker.admit("cpu", KEYS)  # queued nowhere, dropped: the snapshot will cover it
    assert worker.client.statistics()["lookup_failures"] == 1
    assert worker.client.statistics()["events_dropped"] == len(KEYS)


async def test_a_silent_controller_makes_a_lookup_miss_within_the_timeout() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        worker = MemoryWorker(url, "a", heartbeat_seconds=5.0, lookup_timeout=0.15)  # it notices after 15 s
        async with running_worker(worker):
            controller.shutdown()
            await eventually(lambda: controller.addresses is not None and controller._channel is None)
            assert worker.client.connected  # it has not noticed yet
            start = time.monotonic()
            assert await worker.client.lookup(KEYS) == []
            assert 0.1 < time.monotonic() - start < 1.0
            assert worker.client.statistics()["lookup_failures"] == 1


async def test_a_worker_that_stops_is_dropped_after_three_heartbeats() -> None:
    async with running_controller(missed_heartbeats=3) as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "a")) as a:
            a.admit("cpu", KEYS)
            await eventually(lambda: len(controller.index) == len(KEYS))
        await eventually(lambda: controller.counters.drops == 1, within=2.0)
        assert controller.index.workers() == []
        assert len(controller.index) == 0


async def test_tp_ranks_register_as_separate_workers_of_one_instance() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        rank0 = MemoryWorker(url, "a", fingerprint=b"rank0---", rank=0)
        rank1 = MemoryWorker(url, "a", fingerprint=b"rank1---", rank=1)
        async with running_worker(rank0), running_worker(rank1):
            rank0.admit("cpu", make_keys("p", 3, b"rank0---"))
            rank1.admit("cpu", make_keys("p", 5, b"rank1---"))
            await eventually(lambda: len(controller.index) == 8)
            (instance,) = controller.instances()
            assert [(w["rank"], w["chunks_indexed"]) for w in instance["workers"]] == [(0, 3), (1, 5)]
            async with running_worker(MemoryWorker(url, "b", fingerprint=b"rank1---", rank=1)) as peer:
                assert (await peer.client.lookup(make_keys("p", 5, b"rank1---")))[0].chunks == 5


async def test_commands_reach_the_workers_handler() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "a")) as a:
            a.admit("cpu", KEYS)
            (worker,) = controller.workers_of("a")
            answer = await controller.command(worker, "clear", {"keys": [key.hex() for key in KEYS[:2]]})
            assert answer == {"ok": True, "result": {"dropped": {"cpu": 2, "disk": 0}}}
            assert a.commands[0] == ("clear", {"keys": KEYS[:2]})
            failed = await controller.command(worker, "fail", {})
            assert failed == {"ok": False, "error": "RuntimeError: asked to fail"}
            await eventually(lambda: len(controller.index) == len(KEYS) - 2)


async def test_a_registration_of_another_protocol_version_is_refused_by_name() -> None:
    async with running_controller() as controller:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.connect(controller.addresses.zmq)  # type: ignore[union-attr]
            channel = Channel(sock)
            answers: list[list[bytes]] = []
            async with anyio.create_task_group() as group:
                group.start_soon(channel.pump, answers.append)
                meta = {"version": PROTOCOL_VERSION + 1, "instance_id": "x"}
                await channel.send(encode(Kind.REGISTER, meta))
                await channel.send(encode(Kind.HEARTBEAT, {"seq": 0}))
                await eventually(lambda: len(answers) == 2)
                group.cancel_scope.cancel()
        finally:
            sock.close(linger=0)
            context.destroy(linger=0)
        refused, unknown = (decode(frames) for frames in answers)
        assert refused.kind is Kind.ERROR
        assert refused.meta["code"] == "version"
        assert f"speaks version {PROTOCOL_VERSION}" in refused.meta["message"]
        assert unknown.meta["code"] == "unregistered"
        assert controller.counters.refused["version"] == 1


@pytest.mark.parametrize(("given", "connects"), [("secret", True), ("wrong", False), (None, False)])
async def test_workers_need_the_controllers_token(given: str | None, connects: bool) -> None:
    async with running_controller(token="secret") as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        worker = MemoryWorker(url, "a", token=given)
        async with running_worker(worker, registered=False):
            if connects:
                with anyio.fail_after(5):
                    await worker.client.wait_connected()
            else:
                await anyio.sleep(0.3)
                assert not worker.client.connected
                assert controller.index.workers() == []
