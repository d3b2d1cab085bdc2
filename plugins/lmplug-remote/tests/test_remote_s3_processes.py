"""Real processes around s3://: two engines sharing KV through S3, and an S3 server killed mid-workload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import make_config, reference_kv

from remote_testing import assert_nothing_leaked, remote_tier
from s3_servers import S3_BUCKET, SeaweedS3, running_seaweed

ENGINE = """
import hashlib, json, sys, anyio, lmplug
from lmplug.testing import reference_kv

config, role, backend = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
tokens = [(i * 7919 + 13) % 30_000 for i in range(5 * 16 + 3)]

async def main():
    async with lmplug.open_cache(config) as cache:
        if role == "store":
            await cache.store(tokens, reference_kv(tokens, config))
            await cache.pipeline.slots[0].tier.drain()
            print(json.dumps({"stored": cache.pipeline.slots[0].tier.statistics().stored}))
        else:
            kv, hit = await cache.retrieve(tokens)
            digest = lambda t: hashlib.sha256(t.contiguous().view(-1).numpy().tobytes()).hexdigest()
            print(json.dumps({"hit": hit, "sha256": digest(kv), "expected": digest(reference_kv(tokens, config))}))

anyio.run(main, backend=backend)
"""


def s3_config(url: str, server: SeaweedS3, **remote: Any) -> dict[str, Any]:
    return make_config(
        [{"type": "remote", "url": url, "connector": server.options(), **remote}],
        chunk_size=16,
        save_partial_chunks=True,
    )


def engine(config: dict[str, Any], role: str, backend: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", ENGINE, json.dumps(config), role, backend],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_two_processes_share_kv_through_s3(s3_server: SeaweedS3, s3_url: str) -> None:
    config = s3_config(s3_url, s3_server)
    assert engine(config, "store", "asyncio") == {"stored": 6}
    read = engine(config, "retrieve", "trio")
    assert read["hit"] == 5 * 16 + 3
    assert read["sha256"] == read["expected"]


def prompt(seed: int) -> list[int]:
    return [(seed * 7717 + i * 13) % 30_000 for i in range(3 * 16)]


@pytest.fixture
def own_s3_server(tmp_path: Path) -> Any:
    """A server of this test alone: it gets killed and restarted."""
    with running_seaweed(tmp_path) as server:
        yield server
        server.kill()  # its data is thrown away: no need to wait for a clean shutdown


async def test_killed_server_costs_misses_then_hits_again(own_s3_server: SeaweedS3) -> None:
    server = own_s3_server
    url = f"s3://{S3_BUCKET}/outage"
    config = s3_config(url, server, timeout="1s", write_timeout="2s", breaker={"failures": 2, "cooldown": "200ms"})
    held = [prompt(seed) for seed in range(4)]
    with anyio.fail_after(120):  # a hang fails the test instead of stalling the suite
        async with lmplug.open_cache(config) as cache:
            tier = remote_tier(cache)
            for tokens in held:
                await cache.store(tokens, reference_kv(tokens, config))
            await tier.drain()
            assert [await cache.lookup(tokens) for tokens in held] == [48] * 4

            errors: list[str] = []
            stop = anyio.Event()

            async def workload(worker: int) -> None:
                seed = 100 + worker * 1000
                while not stop.is_set():
                    seed += 1
                    tokens = prompt(seed)
                    try:
                        await cache.store(tokens, reference_kv(tokens, config))
                        for old in held:
                            kv, hit = await cache.retrieve(old)
                            if not torch.equal(kv, reference_kv(old, config)[:, :, :hit]):
                                errors.append("wrong KV served")
                    except Exception as exc:  # the cache must never raise for a dead store
                        errors.append(repr(exc))
                    await anyio.sleep(0.01)

            async with anyio.create_task_group() as group:
                for worker in range(3):
                    group.start_soon(workload, worker)
                await anyio.sleep(0.3)
                await anyio.to_thread.run_sync(server.kill)
                await anyio.sleep(1.0)
                # dead: every lookup is a miss, bounded by the tier's timeout
                with anyio.fail_after(5):
                    assert [await cache.lookup(tokens) for tokens in held] == [0] * 4
                await anyio.to_thread.run_sync(server.start)  # same ports, same data directory
                # back: hits again once the breaker lets a probe through
                with anyio.fail_after(30):
                    while await cache.lookup(held[0]) != 48:  # noqa: ASYNC110 (polling the store, not an event)
                        await anyio.sleep(0.1)
                stop.set()
            assert errors == []
            await tier.drain()
            # writes queued during the outage may trip the breaker once more: wait for it to close
            with anyio.fail_after(30):
                for tokens in held:
                    while (await cache.retrieve(tokens))[1] != 48:  # noqa: ASYNC110 (polling the store)
                        await anyio.sleep(0.1)
                    kv, hit = await cache.retrieve(tokens)
                    assert hit == 48
                    assert torch.equal(kv, reference_kv(tokens, config))
            assert tier.statistics().errors >= 1
            await assert_nothing_leaked(cache)  # the outage left no write, lease or chunk memory behind
