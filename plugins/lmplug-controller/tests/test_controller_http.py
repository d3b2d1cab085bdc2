"""The HTTP API through a real HTTP client (the standard library's, in a thread)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lmplug_controller.server import Controller
from lmplug_controller.testing import (
    MemoryWorker,
    eventually,
    http_json,
    make_keys,
    running_controller,
    running_worker,
)

KEYS = make_keys("prompt", 8)
HEX = [key.hex() for key in KEYS]


@pytest.fixture
async def two_workers() -> AsyncIterator[tuple[Controller, MemoryWorker, MemoryWorker]]:
    async with running_controller(command_timeout=0.3) as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "a")) as a, running_worker(MemoryWorker(url, "b")) as b:
            a.admit("cpu", KEYS)
            b.admit("disk", KEYS[:3])
            await eventually(lambda: controller.index.entries() == 11)
            yield controller, a, b


async def test_health_endpoints_and_instances(two_workers: tuple[Controller, MemoryWorker, MemoryWorker]) -> None:
    controller, _, _ = two_workers
    url = controller.addresses.url  # type: ignore[union-attr]
    assert await http_json(url, "GET", "/healthz") == (200, {"ok": True, "workers": 2})
    status, endpoints = await http_json(url, "GET", "/v1/endpoints")
    assert status == 200
    assert endpoints["zmq"] == controller.addresses.zmq  # type: ignore[union-attr]
    status, listing = await http_json(url, "GET", "/v1/instances")
    assert [instance["instance_id"] for instance in listing["instances"]] == ["a", "b"]
    status, one = await http_json(url, "GET", "/v1/instances/a")
    (worker,) = one["workers"]
    assert worker["connected"]
    assert worker["endpoint"] == "127.0.0.1:7000/a"
    assert [(tier["name"], tier["chunks_indexed"]) for tier in worker["tiers"]] == [("cpu", 8), ("disk", 0)]
    await eventually(lambda: controller.index.of_instance("a")[0].stats != {})
    status, one = await http_json(url, "GET", "/v1/instances/a")
    assert one["workers"][0]["tiers"][0]["stats"]["used_bytes"] == 8 * 4096
    assert (await http_json(url, "GET", "/v1/instances/nobody"))[0] == 404


async def test_lookup_by_hex_keys(two_workers: tuple[Controller, MemoryWorker, MemoryWorker]) -> None:
    controller, _, _ = two_workers
    url = controller.addresses.url  # type: ignore[union-attr]
    status, answer = await http_json(url, "POST", "/v1/lookup", {"keys": HEX})
    assert status == 200
    assert [(h["instance_id"], h["tier"], h["chunks"]) for h in answer["holders"]] == [
        ("a", "cpu", 8),
        ("b", "disk", 3),
    ]
    _, answer = await http_json(url, "POST", "/v1/lookup", {"keys": HEX, "exclude_instance": "a"})
    assert [h["instance_id"] for h in answer["holders"]] == ["b"]
    status, error = await http_json(url, "POST", "/v1/lookup", {"keys": [*HEX[:2], "abc"]})
    assert status == 400
    assert "keys[2]" in error["error"]


async def test_bad_requests_name_the_problem(two_workers: tuple[Controller, MemoryWorker, MemoryWorker]) -> None:
    controller, _, _ = two_workers
    url = controller.addresses.url  # type: ignore[union-attr]
    status, error = await http_json(url, "POST", "/v1/clear", b"{nope")
    assert (status, error["error"].startswith("the body is not JSON")) == (400, True)
    status, error = await http_json(url, "POST", "/v1/clear", {"instance_id": "a", "color": "red"})
    assert status == 400
    assert "color" in error["error"]
    status, error = await http_json(url, "POST", "/v1/pin", {"instance_id": "a", "ttl_s": -1})
    assert (status, "ttl_s" in error["error"]) == (400, True)
    assert (await http_json(url, "POST", "/v1/clear", {"instance_id": "nobody"}))[0] == 404
    assert (await http_json(url, "GET", "/v2/whatever"))[0] == 404
    assert (await http_json(url, "GET", "/v1/lookup"))[0] == 405


async def test_clear_pin_unpin_and_health_are_forwarded_to_the_workers(
    two_workers: tuple[Controller, MemoryWorker, MemoryWorker],
) -> None:
    controller, a, _ = two_workers
    url = controller.addresses.url  # type: ignore[union-attr]
    status, answer = await http_json(url, "POST", "/v1/clear", {"instance_id": "a", "tiers": ["cpu"], "keys": HEX[4:]})
    assert status == 200
    assert answer["ok"]
    assert answer["workers"][0]["result"] == {"dropped": {"cpu": 4}}
    await eventually(lambda: controller.index.entries() == 7)
    status, answer = await http_json(url, "POST", "/v1/pin", {"instance_id": "a", "keys": HEX[:2], "ttl_s": 30})
    assert status == 200
    assert a.commands[-1] == ("pin", {"keys": KEYS[:2], "ttl_s": 30})
    await http_json(url, "POST", "/v1/unpin", {"instance_id": "a", "keys": HEX[:2]})
    assert a.commands[-1] == ("unpin", {"keys": KEYS[:2]})
    status, answer = await http_json(url, "POST", "/v1/health", {"instance_id": "a"})
    assert status == 200
    assert answer["workers"][0]["result"] == {"tiers": {"cpu": 4, "disk": 0}}
    assert answer["workers"][0]["connected"]


async def test_move_fetches_at_the_destination_then_clears_the_source(
    two_workers: tuple[Controller, MemoryWorker, MemoryWorker],
) -> None:
    controller, a, b = two_workers
    url = controller.addresses.url  # type: ignore[union-attr]
    status, answer = await http_json(url, "POST", "/v1/move", {"from": "a", "to": "b", "keys": HEX[3:6]})
    assert status == 200
    assert answer["ok"]
    assert b.commands[-1] == ("fetch", {"from_instance": "a", "endpoint": "127.0.0.1:7000/a", "keys": KEYS[3:6]})
    assert a.commands[-1] == ("clear", {"keys": KEYS[3:6]})
    assert a.held["cpu"] == set(KEYS) - set(KEYS[3:6])
    status, answer = await http_json(url, "POST", "/v1/move", {"from": "a", "to": "b", "keys": HEX[:1], "copy": True})
    assert answer["workers"][0]["clear"] is None
    assert KEYS[0] in a.held["cpu"]
    status, error = await http_json(url, "POST", "/v1/move", {"from": "a", "to": "a", "keys": HEX})
    assert (status, error["error"]) == (400, "'from' and 'to' name the same instance")


async def test_a_worker_too_slow_to_answer_gives_504(
    two_workers: tuple[Controller, MemoryWorker, MemoryWorker],
) -> None:
    controller, a, _ = two_workers
    a.command_delay = 1.0
    status, error = await http_json(controller.addresses.url, "POST", "/v1/health", {"instance_id": "a"})  # type: ignore[union-attr]
    assert status == 504
    assert "did not answer 'health' within 0.3 s" in error["error"]
    assert controller.counters.commands[("health", "timeout")] == 1


async def test_metrics_count_what_happened(two_workers: tuple[Controller, MemoryWorker, MemoryWorker]) -> None:
    controller, a, _ = two_workers
    url = controller.addresses.url  # type: ignore[union-attr]
    await a.client.lookup(KEYS)
    status, text = await http_json(url, "GET", "/metrics")
    assert status == 200
    for line in (
        "lmplug_controller_workers 2.0",
        "lmplug_controller_keys_indexed 8.0",
        "lmplug_controller_lookups_total 1.0",
        "lmplug_controller_hit_chunks_total 3.0",
        "lmplug_controller_snapshots_total 2.0",
        "lmplug_controller_drops_total 0.0",
    ):
        assert line in text


async def test_with_a_token_every_api_call_needs_it() -> None:
    async with running_controller(token="s3cret") as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        assert (await http_json(url, "GET", "/healthz"))[0] == 200
        assert (await http_json(url, "GET", "/"))[0] == 200
        for path in ("/v1/instances", "/v1/endpoints", "/metrics"):
            status, error = await http_json(url, "GET", path)
            assert status == 401
            assert "Authorization: Bearer" in error["error"]
            assert (await http_json(url, "GET", path, token="wrong"))[0] == 401
            assert (await http_json(url, "GET", path, token="s3cret"))[0] == 200
        assert (await http_json(url, "POST", "/v1/lookup", {"keys": HEX}))[0] == 401
