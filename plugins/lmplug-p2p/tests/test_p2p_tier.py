"""The ``p2p`` tier: two caches with their own host memory find and fetch each other's KV
through a real controller (in this event loop), and every failure is a miss."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import make_config, reference_kv
from lmplug_controller.testing import running_controller

from p2p_testing import CHUNK, config, eventually, looks_up, prompt


def p2p(cache: lmplug.Cache) -> Any:
    return cache.pipeline.slots[-1].tier


@contextlib.asynccontextmanager
async def two_instances(url: str, **p2p: Any) -> AsyncIterator[tuple[lmplug.Cache, lmplug.Cache]]:
    async with (
        lmplug.open_cache(config(url, "a", **p2p)) as a,
        lmplug.open_cache(config(url, "b", **p2p)) as b,
    ):
        yield a, b


async def test_kv_stored_by_one_instance_is_fetched_by_the_other_and_promoted() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with two_instances(url) as (a, b):
            tokens = prompt(1, 5)
            kv = reference_kv(tokens, config(url, "a"))
            await a.store(tokens, kv)
            await eventually(looks_up(b, tokens, len(tokens)))
            got, count = await b.retrieve(tokens)
            assert count == len(tokens)
            assert torch.equal(got, kv)
            tiers = b.statistics().tiers
            assert (tiers[0].chunks, tiers[1].hits) == (5, 5)  # promoted into b's host memory
            statistics = p2p(b).p2p_statistics()
            assert statistics["fetched_chunks"] == 5
            assert p2p(a).p2p_statistics()["served_requests"] == 1
            # Served from b's own memory now: no second fetch.
            got, count = await b.retrieve(tokens)
            assert count == len(tokens)
            assert p2p(b).p2p_statistics()["fetched_chunks"] == 5


async def test_a_prefix_held_by_a_peer_and_the_rest_nowhere_is_a_shorter_hit() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with two_instances(url) as (a, b):
            tokens = prompt(2, 6)
            kv = reference_kv(tokens, config(url, "a"))
            await a.store(tokens[: 3 * CHUNK], kv[:, :, : 3 * CHUNK])
            await eventually(looks_up(b, tokens, 3 * CHUNK))
            got, count = await b.retrieve(tokens)
            assert count == 3 * CHUNK
            assert torch.equal(got, kv[:, :, : 3 * CHUNK])


async def test_what_a_peer_evicts_is_no_longer_fetched() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with two_instances(url) as (a, b):
            tokens = prompt(3, 4)
            await a.store(tokens, reference_kv(tokens, config(url, "a")))
            await eventually(looks_up(b, tokens, len(tokens)))
            await a.evict(tokens)
            await eventually(looks_up(b, tokens, 0))
            assert (await b.retrieve(tokens))[1] == 0


async def test_an_instance_never_asks_for_its_own_chunks() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with two_instances(url) as (a, _b):
            tokens = prompt(4, 3)
            await a.store(tokens, reference_kv(tokens, config(url, "a")))
            await a.evict(tokens, tiers=["cpu"])
            await anyio.sleep(0.2)
            assert await a.lookup(tokens) == 0  # the controller excludes the asker


async def test_a_peer_that_vanished_is_a_miss_and_no_error() -> None:
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with lmplug.open_cache(config(url, "b")) as b:
            tokens = prompt(5, 4)
            async with lmplug.open_cache(config(url, "a")) as a:
                await a.store(tokens, reference_kv(tokens, config(url, "a")))
                await eventually(looks_up(b, tokens, len(tokens)))
            # a is gone: the controller may still list it until its heartbeats are missed.
            with anyio.fail_after(5):
                _, count = await b.retrieve(tokens)
            assert count == 0
            await eventually(looks_up(b, tokens, 0))


async def test_without_a_controller_every_lookup_is_a_quick_miss() -> None:
    from lmplug.testing import free_port

    url = f"http://127.0.0.1:{free_port()}"
    async with lmplug.open_cache(config(url, "b", lookup_timeout=0.1)) as b:
        tokens = prompt(6, 4)
        with anyio.fail_after(2):
            assert await b.lookup(tokens) == 0
            assert (await b.retrieve(tokens))[1] == 0


async def test_after_the_controller_restarts_the_instances_register_again() -> None:
    from lmplug.testing import free_port

    port = free_port()
    async with running_controller(port=port) as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with two_instances(url) as (a, b):
            tokens = prompt(7, 4)
            kv = reference_kv(tokens, config(url, "a"))
            await a.store(tokens, kv)
            await eventually(looks_up(b, tokens, len(tokens)))
            controller.shutdown()
            await anyio.sleep(1.2)  # past the second in which a controller's answer is reused
            assert await b.lookup(tokens) == 0  # down: a miss
            async with running_controller(port=port):
                # a re-registers with a snapshot of what it holds; b finds it again.
                await eventually(looks_up(b, tokens, len(tokens)), limit=10)
                got, count = await b.retrieve(tokens)
                assert count == len(tokens)
                assert torch.equal(got, kv)


@pytest.mark.parametrize(
    "options",
    [
        {"controller": "redis://x:1"},
        {"controller": "http://h"},
        {"controller": "http://h:1", "host": "0.0.0.0"},
        {"controller": "http://h:1", "advertise": "h"},
    ],
)
async def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(lmplug.ConfigError, match="tiers"):
        async with lmplug.open_cache(make_config([{"type": "cpu", "capacity": "1MiB"}, {"type": "p2p", **options}])):
            pass


async def test_the_controllers_commands_move_pin_and_clear_an_instances_chunks() -> None:
    from lmplug_controller.testing import http_json

    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with two_instances(url) as (a, b):
            tokens = prompt(8, 3)
            kv = reference_kv(tokens, config(url, "a"))
            await a.store(tokens, kv)
            await eventually(looks_up(b, tokens, len(tokens)))
            keys = [key.hex() for key in a.keys(tokens)]

            status, moved = await http_json(url, "POST", "/v1/move", {"from": "a", "to": "b", "keys": keys})
            assert (status, moved["ok"]) == (200, True), moved
            assert b.statistics().tiers[0].chunks == 3  # fetched into b's host memory
            assert a.statistics().tiers[0].chunks == 0  # and dropped by a (not a copy)
            got, count = await b.retrieve(tokens)
            assert count == len(tokens)
            assert torch.equal(got, kv)

            status, pinned = await http_json(url, "POST", "/v1/pin", {"instance_id": "b", "keys": keys, "ttl_s": 60})
            assert status == 200, pinned
            (worker,) = pinned["workers"]
            assert worker["result"]["chunks"] == 3
            status, cleared = await http_json(url, "POST", "/v1/clear", {"instance_id": "b"})
            assert status == 200, cleared
            assert b.statistics().tiers[0].chunks == 3  # pinned: not dropped
            status, _ = await http_json(url, "POST", "/v1/unpin", {"instance_id": "b", "keys": keys})
            assert status == 200
            status, cleared = await http_json(url, "POST", "/v1/clear", {"instance_id": "b"})
            assert status == 200, cleared
            assert b.statistics().tiers[0].chunks == 0

            status, health = await http_json(url, "POST", "/v1/health", {"instance_id": "a"})
            assert status == 200, health
            assert health["workers"][0]["result"]["tiers"]["cpu"]["chunks"] == 0


async def test_a_transport_no_plugin_provides_names_the_ones_there_are() -> None:
    stack = make_config(
        [{"type": "cpu", "capacity": "1MiB"}, {"type": "p2p", "controller": "http://h:1", "transport": "pigeon"}]
    )
    with pytest.raises(lmplug.PluginUnavailable, match=r"'pigeon' \(transports available: tcp\)"):
        async with lmplug.open_cache(stack):
            pass
