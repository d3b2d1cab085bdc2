"""The remote tier's own behaviour, over the dict:// test connector (real stores: other modules)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import yaml

import lmplug
import lmplug.tierkit
from lmplug.testing import make_config, reference_kv

from remote_testing import STORES, dict_host, remote_tier, two_tier_config

CHUNK = 16


def prompt(seed: int, tokens: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30_000 for i in range(tokens)]


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    name = request.node.name.replace("[", "-").replace("]", "")
    STORES.pop(name, None)
    return f"dict://{name}"


async def test_second_cache_hits_what_the_first_stored(url: str) -> None:
    config = two_tier_config(url)
    tokens = prompt(1, 3 * CHUNK + 5)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config, plugins=dict_host()) as first:
        await first.store(tokens, kv)
        await remote_tier(first).drain()
    async with lmplug.open_cache(config, plugins=dict_host()) as second:
        assert await second.lookup(tokens) == len(tokens)
        got, hit = await second.retrieve(tokens)
        assert hit == len(tokens)
        assert torch.equal(got, kv)
        assert remote_tier(second).statistics().hits == 4


async def test_queued_writes_are_served_from_memory(url: str) -> None:
    config = two_tier_config(url, connector={"latency": "50ms"})
    tokens = prompt(2, 2 * CHUNK)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        await cache.store(tokens, kv)
        tier = remote_tier(cache)
        assert tier.statistics().pending_writes == 2
        await cache.evict(tokens, tiers=["cpu"])
        got, hit = await cache.retrieve(tokens)
        assert hit == len(tokens)
        assert torch.equal(got, kv)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
async def test_a_first_tier_retrieves_into_the_callers_buffer(url: str, codec: str) -> None:
    """Alone in the stack, the tier writes into ``out``: queued chunks from memory, the rest as the
    store sends them (raw: received in place; other codecs: decoded through a chunk)."""
    config = make_config(
        [{"type": "remote", "url": url, "codec": codec, "connector": {"latency": "50ms"}}],
        chunk_size=CHUNK,
        save_partial_chunks=True,
    )
    tokens = prompt(5, 3 * CHUNK + 4)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        tier = remote_tier(cache)
        await cache.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
        await tier.drain()
        await cache.store(tokens, kv[:, :, 2 * CHUNK :], start=2 * CHUNK)
        assert tier.statistics().pending_writes == 2  # two chunks in the store, two still queued
        out = torch.full((*kv.shape[:2], len(tokens) + 3, kv.shape[3]), float("nan"), dtype=kv.dtype)
        got, hit = await cache.retrieve(tokens, out=out)
        assert hit == len(tokens)
        assert torch.equal(got, kv)
        await tier.drain()
        out.fill_(float("nan"))
        got, hit = await cache.retrieve(tokens, out=out)
        assert hit == len(tokens)
        assert torch.equal(got, kv)


DAMAGES = ["flip_payload", "flip_header", "truncate", "foreign", "grow"]


def damaged(value: bytes, damage: str, foreign: bytes) -> bytes:
    """A stored entry damaged as ``damage`` names; ``foreign`` is another key's good entry."""
    bad = bytearray(value)
    if damage == "flip_payload":
        bad[-3] ^= 0x40
    elif damage == "flip_header":
        bad[20] ^= 0x01
    elif damage == "truncate":
        del bad[-100:]
    elif damage == "foreign":
        bad = bytearray(foreign)
    elif damage == "grow":
        bad += b"\0" * 4096
    return bytes(bad)


@pytest.mark.parametrize("damage", DAMAGES)
async def test_bad_entries_are_misses_and_are_deleted(url: str, damage: str) -> None:
    config = two_tier_config(url)
    tokens = prompt(3, 2 * CHUNK)
    other = prompt(4, 2 * CHUNK)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        await cache.store(other, reference_kv(other, config))
        tier = remote_tier(cache)
        await tier.drain()
        keys = cache.keymaker.keys(tokens)
        names = [tier.key_name(key) for key in keys]
        store = STORES[url.removeprefix("dict://")]
        store[names[1]] = damaged(store[names[1]], damage, store[tier.key_name(cache.keymaker.keys(other)[1])])
        await cache.evict(tokens, tiers=["cpu"])
        got, hit = await cache.retrieve(tokens)
        assert hit == CHUNK  # the first chunk is good, the second is never served
        assert torch.equal(got, reference_kv(tokens, config)[:, :, :CHUNK])
        assert names[1] not in store
        assert tier.statistics().errors >= 1


@pytest.mark.parametrize("damage", DAMAGES)
async def test_bad_entries_received_into_the_callers_buffer_are_misses(url: str, damage: str) -> None:
    """Alone in the stack, the tier receives raw entries straight into ``out`` and checks them
    there: a bad one ends the hit, and the KV before it is right."""
    config = make_config([{"type": "remote", "url": url}], chunk_size=CHUNK, save_partial_chunks=True)
    tokens = prompt(6, 3 * CHUNK + 4)
    other = prompt(7, 3 * CHUNK)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        tier = remote_tier(cache)
        await cache.store(tokens, kv)
        await cache.store(other, reference_kv(other, config))
        await tier.drain()
        names = [tier.key_name(key) for key in cache.keymaker.keys(tokens)]
        store = STORES[url.removeprefix("dict://")]
        store[names[1]] = damaged(store[names[1]], damage, store[tier.key_name(cache.keymaker.keys(other)[1])])
        out = lmplug.empty_kv(cache.layout, len(tokens))
        got, hit = await cache.retrieve(tokens, out=out)
        assert got.data_ptr() == out.data_ptr()  # the read went into out
        assert hit == CHUNK
        assert torch.equal(got, kv[:, :, :CHUNK])
        assert names[1] not in store
        assert tier.statistics().errors >= 1


async def test_another_codec_misses(url: str) -> None:
    tokens = prompt(5, 2 * CHUNK)
    async with lmplug.open_cache(two_tier_config(url), plugins=dict_host()) as cache:
        await cache.store(tokens, reference_kv(tokens, cache.config.model_dump()))
        await remote_tier(cache).drain()
    host = dict_host()
    host.codecs["other"] = type("Other", (lmplug.tierkit.RawCodec,), {"name": "other"})()
    async with lmplug.open_cache(two_tier_config(url, codec="other"), plugins=host) as cache:
        assert await cache.lookup(tokens) == 0


async def test_dead_store_is_a_quick_miss_then_recovers(url: str, caplog: pytest.LogCaptureFixture) -> None:
    config = two_tier_config(url, breaker={"failures": 2, "cooldown": "200ms"})
    tokens = prompt(6, 2 * CHUNK)
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        tier = remote_tier(cache)
        await cache.store(tokens, kv)
        await tier.drain()
        await cache.evict(tokens, tiers=["cpu"])
        before = tier.connector.calls.get("exists", 0) + tier.connector.calls.get("get", 0)
        tier.connector.down = True
        with caplog.at_level(logging.WARNING, "lmplug.remote"):
            for _ in range(4):
                assert await cache.lookup(tokens) == 0
                assert (await cache.retrieve(tokens))[1] == 0
        assert tier.breaker.state.value == "open"
        asked = tier.connector.calls.get("exists", 0) + tier.connector.calls.get("get", 0) - before
        assert asked == 2  # once open, the store is not asked at all
        assert "failing" in caplog.text
        tier.connector.down = False
        await anyio.sleep(0.25)
        assert await cache.lookup(tokens) == len(tokens)
        got, hit = await cache.retrieve(tokens)
        assert hit == len(tokens)
        assert torch.equal(got, kv)
        assert tier.breaker.state.value == "closed"


async def test_hung_store_times_out_into_a_miss(url: str) -> None:
    config = two_tier_config(url, timeout="100ms", write_timeout="100ms")
    tokens = prompt(7, CHUNK)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        tier = remote_tier(cache)
        tier.connector.hang = True
        with anyio.fail_after(5):
            await cache.store(tokens, reference_kv(tokens, config))
            await tier.drain()
            await cache.evict(tokens, tiers=["cpu"])
            assert await cache.lookup(tokens) == 0
        assert tier.statistics().errors >= 1
        assert tier.statistics().stored == 0


async def test_store_down_at_start_still_serves(url: str) -> None:
    config = two_tier_config(url)
    host = dict_host()
    from remote_testing import DictConnector

    original = DictConnector.connect

    async def refuse(self: DictConnector) -> None:
        raise lmplug.TierUnavailable("connection refused (test)")

    DictConnector.connect = refuse  # type: ignore[method-assign]
    try:
        async with lmplug.open_cache(config, plugins=host) as cache:
            tokens = prompt(8, CHUNK)
            await cache.store(tokens, reference_kv(tokens, config))
            assert (await cache.retrieve(tokens))[1] == CHUNK  # L1 serves
    finally:
        DictConnector.connect = original  # type: ignore[method-assign]


async def test_evict_deletes_from_the_store(url: str) -> None:
    config = two_tier_config(url)
    tokens = prompt(9, 2 * CHUNK)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        await remote_tier(cache).drain()
        await cache.evict(tokens)
        assert await cache.lookup(tokens) == 0
        assert STORES[url.removeprefix("dict://")] == {}


async def test_evict_counts_only_the_entries_it_dropped(url: str) -> None:
    config = two_tier_config(url)
    tokens = prompt(11, 2 * CHUNK)
    async with lmplug.open_cache(config, plugins=dict_host()) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        tier = remote_tier(cache)
        await tier.drain()
        store = STORES[url.removeprefix("dict://")]
        assert len(store) == 2
        del store[min(store)]  # another engine evicted one of the two already
        await cache.evict(tokens)
        assert store == {}
        assert tier.statistics().evictions == 1


async def test_write_skips_what_the_store_holds(url: str) -> None:
    config = two_tier_config(url)
    tokens = prompt(10, 2 * CHUNK)
    for _ in range(2):
        async with lmplug.open_cache(config, plugins=dict_host()) as cache:
            await cache.store(tokens, reference_kv(tokens, config))
            tier = remote_tier(cache)
            await tier.drain()
    assert tier.connector.calls.get("put", 0) == 0
    assert tier.statistics().stored == 0


def test_unknown_scheme_names_what_is_there() -> None:
    config: dict[str, Any] = two_tier_config("nosuch://x")
    with pytest.raises(lmplug.PluginUnavailable, match=r"scheme 'nosuch'.*dict"):
        anyio.run(_open, config)


def test_connector_options_are_validated() -> None:
    config = two_tier_config("dict://x", connector={"latncy": 1})
    with pytest.raises(lmplug.ConfigError, match=r"connector\.latncy: unknown key"):
        anyio.run(_open, config)


def test_config_check_finds_typos_in_connector_options(tmp_path: Path) -> None:
    """``lmplug config check`` validates a connector's options against its scheme, building nothing."""
    path = tmp_path / "lmplug.yaml"
    config = make_config([{"type": "remote", "url": "s3://bucket/kv", "connector": {"pasword": "x"}}])
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "lmplug.cli", "config", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "tiers[0]: invalid options of the s3:// connector: connector.pasword: unknown key" in done.stderr
    config["tiers"][0]["connector"] = {"region": "eu-west-1"}
    path.write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [sys.executable, "-m", "lmplug.cli", "config", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr


def test_unknown_codec_is_an_error() -> None:
    config = two_tier_config("dict://x", codec="nope")
    with pytest.raises(lmplug.PluginUnavailable, match=r"codec 'nope'.*raw"):
        anyio.run(_open, config)


async def _open(config: dict[str, Any]) -> None:
    async with lmplug.open_cache(config, plugins=dict_host()):
        pass
