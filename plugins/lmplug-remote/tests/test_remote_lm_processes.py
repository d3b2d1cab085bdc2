"""lm:// across real processes: two engines share KV, a graceful SIGTERM, a kill -9 and a restart."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import make_config, reference_kv
from lmplug_remote.lm import LmOptions
from lmplug_remote.lm.connector import LmConnector
from lmplug_server import protocol
from lmplug_server.protocol import ItemStatus, Op
from lmplug_server.testing import LmServerProcess, ServerFactory, read_exactly

from remote_testing import remote_tier

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


async def test_kill_9_during_a_workload_then_restart_on_the_same_port(lm_servers: ServerFactory) -> None:
    server = lm_servers("--capacity", "64MiB")
    config = remote_config(
        server.url,
        timeout="1s",
        write_timeout="2s",
        breaker={"failures": 2, "cooldown": "50ms", "max_cooldown": "200ms"},
    )
    prompts = [[(seed * 7919 + i * 31) % 30_000 for i in range(3 * CHUNK)] for seed in range(40)]

    async with lmplug.open_cache(config) as cache:
        tier = remote_tier(cache)

        async def round_trip(tokens: list[int]) -> int:
            await cache.store(tokens, reference_kv(tokens, config))
            await tier.drain()
            await cache.evict(tokens, tiers=["cpu"])  # the next retrieve must come from the server
            kv, count = await cache.retrieve(tokens)
            assert torch.equal(kv, reference_kv(tokens, config)[:, :, :count])  # never wrong data
            return count

        with anyio.fail_after(120):  # a hang fails the test instead of the session
            for tokens in prompts[:10]:
                assert await round_trip(tokens) == len(tokens)
            await anyio.to_thread.run_sync(server.kill)
            for tokens in prompts[10:20]:
                assert await round_trip(tokens) == 0  # misses, quickly, while the server is gone
            await anyio.to_thread.run_sync(server.start)  # same port
            hits = 0
            for tokens in prompts[20:40]:
                await anyio.sleep(0.05)  # let the breaker's cooldown pass
                hits += await round_trip(tokens) == len(tokens)
            assert hits >= 15  # back to hits once the breaker has probed the restarted server
