"""Real processes around redis: two engines sharing KV, and a redis-server killed under load."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch

import lmplug
from lmplug.testing import make_config, reference_kv

from redis_servers import RedisClusterServers, RedisServer
from remote_testing import assert_nothing_leaked, remote_tier, two_tier_config

CHUNK = 16

# Stores a prompt through each config's remote tier and waits until it is written (asyncio).
STORER = """
import json, sys, anyio, lmplug
from lmplug.testing import reference_kv

configs, tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2])

async def main():
    for config in configs:
        async with lmplug.open_cache(config) as cache:
            assert await cache.store(tokens, reference_kv(tokens, config)) == len(tokens)
            await cache.pipeline.slots[0].tier.drain()
            print(cache.pipeline.slots[0].tier.statistics().stored, flush=True)

anyio.run(main, backend="asyncio")
"""

# Retrieves the prompt in a fresh process (trio) and writes the KV bytes it got to files.
RETRIEVER = """
import json, sys, anyio, lmplug

configs, tokens, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

async def main():
    for index, config in enumerate(configs):
        async with lmplug.open_cache(config) as cache:
            print(await cache.lookup(tokens), flush=True)
            kv, hit = await cache.retrieve(tokens)
            print(hit, flush=True)
            with open(f"{out}.{index}", "wb") as f:
                f.write(kv.contiguous().view(-1).numpy().tobytes())

anyio.run(main, backend="trio")
"""


def _python(script: str, *arguments: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_two_processes_share_kv_through_redis_and_redis_cluster(
    redis_server: RedisServer, redis_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    configs = []
    for servers in (redis_server, redis_cluster):
        servers.flush()
        # Only the remote tier, with 64 KiB chunks: every hit comes from redis.
        config = make_config([{"type": "remote", "url": servers.url}], num_layers=4, num_kv_heads=8, head_size=64)
        configs.append(config | {"save_partial_chunks": True})
    tokens = [(i * 7 + 3) % 30_000 for i in range(4 * CHUNK + 5)]
    arguments = (json.dumps(configs), json.dumps(tokens))
    assert _python(STORER, *arguments) == ["5", "5"]  # one Python process stores into both ...
    out = tmp_path / "kv"
    assert _python(RETRIEVER, *arguments, str(out)) == [str(len(tokens))] * 4  # ... another hits
    for index, config in enumerate(configs):
        expected = reference_kv(tokens, config).contiguous().view(-1).numpy().tobytes()
        assert Path(f"{out}.{index}").read_bytes() == expected


async def test_killed_server_costs_misses_then_recovers_on_restart(
    redis_servers: Callable[..., RedisServer],
) -> None:
    server = redis_servers()
    assert server.process is not None
    config: dict[str, Any] = two_tier_config(
        server.url,
        timeout="500ms",
        write_timeout="1s",
        breaker={"failures": 2, "cooldown": "100ms", "max_cooldown": "200ms"},
        connector={"connect_timeout": "500ms", "socket_timeout": "1s"},
    )
    prompts = [[(seed * 7919 + i * 31) % 30_000 for i in range(2 * CHUNK)] for seed in range(40)]
    wrong: list[str] = []
    fresh: list[tuple[int, int]] = []  # (lookup, retrieve) of each prompt just stored: queued or written
    older: list[tuple[int, int]] = []  # and of the one stored four before it: written, or lost with the server
    cache = lmplug.open_cache(config)
    async with cache:
        tier = remote_tier(cache)

        async def check(index: int, answers: list[tuple[int, int]]) -> None:
            tokens = prompts[index]
            kv = reference_kv(tokens, config)
            await cache.evict(tokens, tiers=["cpu"])
            found = await cache.lookup(tokens)
            got, hit = await cache.retrieve(tokens)
            answers.append((found, hit))
            if not torch.equal(got, kv[:, :, :hit]):
                wrong.append(f"prompt {index}: wrong KV in the {hit} tokens served ({found} found)")

        async def workload() -> None:
            for index, tokens in enumerate(prompts):
                if index == 4:
                    await tier.drain()
                if index == 8:
                    assert tier.statistics().stored >= 8
                    server.kill()  # SIGKILL, with writes queued and in flight
                await cache.store(tokens, reference_kv(tokens, config))
                await check(index, fresh)
                if index >= 4:
                    await check(index - 4, older)

        with anyio.fail_after(60):  # a guard against a hang; each call is bounded by the tier's timeouts
            await workload()
            assert wrong == []  # while the server dies too, what is served is right
            whole = 2 * CHUNK
            assert fresh[:8] + older[:4] == [(whole, whole)] * 12  # up: each prompt found and served whole
            for found, hit in fresh[8:] + older[4:]:  # dying, then dead: a retrieve serves what the lookup found
                assert 0 <= hit <= found <= whole
            assert min(hit for _, hit in older[4:]) == 0  # the kill did cost misses
            await assert_nothing_leaked(cache)  # writes to a dead server were given up, not kept
            for tokens in prompts[:4]:  # the server is gone (and so is its data): misses
                await cache.evict(tokens, tiers=["cpu"])
                assert await cache.lookup(tokens) == 0
                assert (await cache.retrieve(tokens))[1] == 0
        assert tier.statistics().errors >= 1

        server.start()  # the same port, empty
        tokens = prompts[0]
        kv = reference_kv(tokens, config)
        with anyio.fail_after(30):
            while True:  # until the breaker lets the prompt's writes through (it probes with one call)
                await cache.evict(tokens)  # so that the store below writes it again
                await cache.store(tokens, kv)
                await tier.drain()
                await cache.evict(tokens, tiers=["cpu"])
                if await cache.lookup(tokens) == len(tokens):
                    break
                await anyio.sleep(0.05)
            got, hit = await cache.retrieve(tokens)
        assert hit == len(tokens)
        assert torch.equal(got, kv)
        await assert_nothing_leaked(cache)
    stats = cache.allocator.statistics()
    assert (stats.used_bytes, stats.allocations) == (0, 0)  # nothing the outage held leaked


async def test_engine_serves_l1_while_redis_is_down(redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers()
    server.kill()
    config = two_tier_config(server.url, timeout="500ms", connector={"connect_timeout": "500ms"})
    tokens = [(i * 13) % 30_000 for i in range(3 * CHUNK)]
    kv = reference_kv(tokens, config)
    with anyio.fail_after(30):
        async with lmplug.open_cache(config) as cache:  # down at start: not an error
            await cache.store(tokens, kv)
            await remote_tier(cache).drain()
            got, hit = await cache.retrieve(tokens)
    assert hit == len(tokens)
    assert torch.equal(got, kv)
