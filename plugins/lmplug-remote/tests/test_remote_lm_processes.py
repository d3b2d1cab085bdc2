"""lm:// across real processes: two engines share KV, a graceful SIGTERM, a kill -9 and a restart."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import make_config, reference_kv
from lmplug_remote.lm import LmOptions
from lmplug_remote.lm.connector import LmConnector
from lmplug_server import protocol
from lmplug_server.fuzzing import check_server
from lmplug_server.protocol import ItemStatus, Op
from lmplug_server.testing import LmServerProcess, ServerFactory, read_exactly

from remote_testing import assert_nothing_leaked, remote_tier

CHUNK = 16

STORE = """
import json, sys, anyio, lmplug
from lmplug.testing import reference_kv

config, tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2])

async def main():
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        await cache.drain()
        print(json.dumps(cache.statistics().tiers[-1].stored))

anyio.run(main)
"""

RETRIEVE = """
import hashlib, json, sys, anyio, lmplug

config, tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2])

async def main():
    async with lmplug.open_cache(config) as cache:
        kv, count = await cache.retrieve(tokens)
        data = kv.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
        print(json.dumps({"count": count, "sha256": hashlib.sha256(data).hexdigest()}))

anyio.run(main)
"""


def remote_config(url: str, **remote: Any) -> dict[str, Any]:
    return make_config(
        [{"type": "cpu", "capacity": "4MiB"}, {"type": "remote", "url": url, **remote}],
        chunk_size=CHUNK,
        save_partial_chunks=True,
        num_layers=4,
        num_kv_heads=4,
        head_size=32,
    )


def run_script(script: str, *arguments: str) -> Any:
    done = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_share_kv_through_the_server(lm_url: str) -> None:
    config = remote_config(lm_url)
    config["namespace"] = "two-processes"
    tokens = [(i * 37 + 11) % 30_000 for i in range(5 * CHUNK + 7)]
    stored = run_script(STORE, json.dumps(config), json.dumps(tokens))
    assert stored == 6
    got = run_script(RETRIEVE, json.dumps(config), json.dumps(tokens))
    assert got["count"] == len(tokens)
    expected = reference_kv(tokens, config).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert got["sha256"] == hashlib.sha256(expected).hexdigest()


def _raw(server: LmServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _reserved(server: LmServerProcess) -> int:
    async def ask() -> int:
        async with LmConnector(server.url, LmOptions()) as client:
            return int((await client.server_statistics())["memory"]["reserved"])

    return anyio.run(ask)


def test_sigterm_finishes_the_request_in_flight_then_exits(lm_servers: ServerFactory) -> None:
    server = lm_servers("--capacity", "64MiB")
    value = bytes(range(256)) * 4096  # 1 MiB
    with _raw(server) as busy, _raw(server) as idle:
        idle.sendall(protocol.encode_simple(Op.HEALTH, 1))
        assert len(read_exactly(idle, 24)) == 24
        busy.sendall(protocol.encode_keyed_request(Op.PUT, 2, [b"in-flight"], [0], [len(value)]))
        busy.sendall(value[:1000])
        deadline = time.monotonic() + 30
        while _reserved(server) == 0:  # the server is in the middle of receiving the value
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        busy.sendall(value[1000:])
        reply = read_exactly(busy, 24 + 16)
        assert protocol.parse_reply_items(reply[24:], 1)[0].status is ItemStatus.OK
        assert busy.recv(1) == b""  # then the server closed it
        assert idle.recv(1) == b""  # and the idle one at once
        # It exits by itself; a second SIGTERM (stop) could land after its handler is gone.
        assert server.process.wait(30) == 0
    server.stop()
    with pytest.raises(ConnectionRefusedError), _raw(server):
        pass


class WireCalls:
    """Wraps a connector's calls in place to count those on the wire now."""

    def __init__(self, connector: Any) -> None:
        self.in_flight = 0
        for name in ("exists", "get_into", "put_many", "delete"):
            setattr(connector, name, self._counted(getattr(connector, name)))

    def _counted(self, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any) -> Any:
            self.in_flight += 1
            try:
                return await call(*args)
            finally:
                self.in_flight -= 1

        return counted


async def wait_for(condition: Callable[[], bool]) -> None:
    """Returns as soon as ``condition()`` holds, without a checkpoint after it does."""
    while not condition():  # noqa: ASYNC110 (polling counters the tasks keep, not an event)
        await anyio.sleep(0.001)


def prompt(seed: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30_000 for i in range(3 * CHUNK)]


async def test_kill_9_during_a_workload_then_restart_on_the_same_port(lm_servers: ServerFactory) -> None:
    """SIGKILL while four tasks store and retrieve through the server, with calls on the wire:
    every KV served before, during and after the outage is right (a miss is fine), the server
    restarted on the same port serves hits again, and neither the cache nor the server leaks."""
    server = lm_servers("--capacity", "64MiB")
    config = remote_config(
        server.url,
        timeout="1s",
        write_timeout="2s",
        breaker={"failures": 2, "cooldown": "50ms", "max_cooldown": "200ms"},
        connector={"connections": 32},  # more than the tier's readers and writers: no call waits for one
    )
    phase = ["up"]  # what the server is doing now: up, down, restarted
    served: dict[str, list[int]] = {"up": [], "down": [], "restarted": []}  # tokens per retrieve, by when stored
    wrong: list[str] = []
    stop = anyio.Event()

    async with lmplug.open_cache(config) as cache:
        tier = remote_tier(cache)
        calls = WireCalls(tier.connector)

        async def worker(number: int) -> None:
            stored: list[tuple[list[int], str]] = []
            for seed in range(number * 100_000, (number + 1) * 100_000):
                if stop.is_set():
                    return
                tokens = prompt(seed)
                await cache.store(tokens, reference_kv(tokens, config))
                stored.append((tokens, phase[0]))
                if len(stored) >= 3:  # one stored two rounds ago: written by now, or on the way
                    old, when = stored[-3]
                    await cache.evict(old, tiers=["cpu"])  # so that it comes from the remote tier
                    kv, count = await cache.retrieve(old)
                    if not torch.equal(kv, reference_kv(old, config)[:, :, :count]):
                        wrong.append(f"worker {number}, seed {seed - 2}: wrong KV in the {count} tokens served")
                    served[when].append(count)

        def hits(when: str) -> int:
            return sum(count == 3 * CHUNK for count in served[when])

        with anyio.fail_after(120):  # a hang fails the test instead of the session
            async with anyio.create_task_group() as group:
                for number in range(4):
                    group.start_soon(worker, number)
                await wait_for(lambda: hits("up") >= 8)  # the workload is flowing
                await wait_for(lambda: calls.in_flight > 0)
                in_flight = calls.in_flight
                assert server.process is not None
                server.process.send_signal(signal.SIGKILL)  # no await since the count: those calls are on the wire
                phase[0] = "down"
                await anyio.to_thread.run_sync(server.kill)  # reaped
                await wait_for(lambda: len(served["down"]) >= 8)  # the workload goes on against the dead server
                await anyio.to_thread.run_sync(server.start)  # same port, empty
                phase[0] = "restarted"
                await wait_for(lambda: hits("restarted") >= 8)  # hits again once the breaker has probed the new one
                stop.set()

            assert wrong == []  # never wrong data, whatever the timing of the kill
            assert in_flight >= 1, "no call was on the wire at the kill"
            assert hits("down") < len(served["down"])  # the kill did cost misses

            # What the restarted server holds comes back from it, not from the write-behind queue.
            for seed in range(1_000_000, 1_000_004):
                tokens, kv = prompt(seed), reference_kv(prompt(seed), config)
                count = 0
                while count < len(tokens):  # a write queued in the outage may trip the breaker once more
                    await cache.evict(tokens)  # so that the store below writes it again
                    await cache.store(tokens, kv)
                    await tier.drain()
                    await cache.evict(tokens, tiers=["cpu"])
                    got, count = await cache.retrieve(tokens)
                    assert torch.equal(got, kv[:, :, :count])
                    if count < len(tokens):
                        await anyio.sleep(0.05)
            await assert_nothing_leaked(cache)
    await check_server(server.port, None, {})  # nothing reserved, no connection left open but the check's
