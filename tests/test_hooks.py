"""The hook contract: one test per hook, and every hook documented (spec and docs/hooks.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lmplug
from lmplug import tierkit
from lmplug.core.memory import HeapAllocator
from lmplug.hooks import specs
from lmplug.hooks.specs import make_plugin_manager
from lmplug.testing import free_port, make_config, reference_kv

ROOT = Path(__file__).parents[1]
HOOKS = sorted(name for name in vars(specs) if name.startswith("lmplug_"))
CHUNK = 16


@pytest.fixture
def stack(third_party_plugins: Path) -> dict[str, Any]:
    """L1 in memory above the memo tier (a stand-in for a slower, lower tier)."""
    return make_config([{"type": "cpu", "capacity": "1MiB"}, {"type": "memo", "name": "low"}], chunk_size=CHUNK)


def tokens(seed: int, chunks: int) -> list[int]:
    return [(seed * 131 + i * 7) % 30_000 for i in range(chunks * CHUNK)]


def test_every_hook_has_a_test() -> None:
    here = Path(__file__).read_text()
    assert [name for name in HOOKS if f"def test_hook_{name}" not in here] == []


def test_every_hook_is_documented() -> None:
    docs = (ROOT / "docs" / "hooks.md").read_text()
    pm = make_plugin_manager()
    for name in HOOKS:
        doc = getattr(specs, name).__doc__ or ""
        for section in ("**Call pattern:**", "**Colour:**", "**Process:**", ":returns:"):
            assert section in doc, f"{name} docstring lacks {section}"
        argnames = pm.hook.__dict__[name].spec.argnames
        assert re.search(rf"^## `{name}\({', '.join(argnames)}\)`", docs, re.MULTILINE), f"docs/hooks.md lacks {name}"


async def test_hook_lmplug_register_tier_types(third_party_plugins: Path) -> None:
    host = lmplug.PluginHost.from_environment({})
    assert {"cpu", "memo"} <= set(host.tier_types)
    assert host.tier_types["memo"].config_model.__name__ == "MemoOptions"


def test_hook_lmplug_register_commands(third_party_plugins: Path) -> None:
    from lmplug.cli import build_parser

    parser, runners = build_parser(lmplug.PluginHost.from_environment({}))
    assert "memo-info" in runners
    assert parser.parse_args(["memo-info", "x"]).word == "x"


async def test_hook_lmplug_register_remote_schemes(third_party_plugins: Path) -> None:
    pytest.importorskip("lmplug_remote", reason="the remote tier comes with lmplug-remote")
    host = lmplug.PluginHost.from_environment({})
    assert host.remote_schemes["memo"].config_model.__name__ == "MemoOptions"
    config = make_config([{"type": "cpu", "capacity": "1MiB"}, {"type": "remote", "url": "memo://hooks"}])
    prompt = tokens(2, 2)
    kv = reference_kv(prompt, config)
    async with lmplug.open_cache(config, plugins=host) as cache:
        await cache.store(prompt, kv)
        await cache.drain()
        await cache.evict(prompt, tiers=["cpu"])
        got, hit = await cache.retrieve(prompt)
    assert hit == len(prompt)
    assert torch.equal(got, kv)


async def test_hook_lmplug_register_codecs(third_party_plugins: Path) -> None:
    pytest.importorskip("lmplug_remote", reason="the remote tier comes with lmplug-remote")
    host = lmplug.PluginHost.from_environment({})
    assert isinstance(host.codecs["raw"], tierkit.RawCodec)
    config = make_config(
        [{"type": "cpu", "capacity": "1MiB"}, {"type": "remote", "url": "memo://hooks", "codec": "reversed"}]
    )
    prompt = tokens(3, 1)
    kv = reference_kv(prompt, config)
    async with lmplug.open_cache(config, plugins=host) as cache:
        await cache.store(prompt, kv)
        await cache.drain()
        memo = sys.modules["lmplug_memo"]
        (stored,) = [value for key, value in memo.BLOBS.items() if key.startswith("lmplug/reversed/")]
        assert stored[-kv.numel() * 4 :] == kv.numpy().tobytes()[::-1]  # header, then the codec's bytes
        await cache.evict(prompt, tiers=["cpu"])
        got, hit = await cache.retrieve(prompt)
    assert hit == len(prompt)
    assert torch.equal(got, kv)


async def test_hook_lmplug_chunks_evicted(stack: dict[str, Any]) -> None:
    seen: list[tuple[str, int]] = []

    class Listener:
        @tierkit.hookimpl
        def lmplug_chunks_evicted(self, tier: str, keys: Any) -> None:
            seen.append((tier, len(keys)))

    host = lmplug.PluginHost.from_environment({})
    host.register(Listener(), "listener")
    async with lmplug.open_cache(stack, plugins=host) as cache:
        prompt = tokens(1, 3)
        await cache.store(prompt, reference_kv(prompt, stack))
        await cache.evict(prompt)
    assert seen == [("cpu", 3), ("low", 3)]


async def test_hook_lmplug_register_transports() -> None:
    """A plugin adds a peer transport; a p2p tier that names it is built with it."""
    transfer = pytest.importorskip("lmplug_p2p.transfer", reason="the p2p tier comes with lmplug-p2p")
    built: list[Any] = []

    def counting(settings: Any) -> Any:
        built.append(settings)
        return transfer.TcpTransport(settings)

    class Carrier:
        @tierkit.hookimpl
        def lmplug_register_transports(self, register: Any) -> None:
            register(tierkit.PeerTransport("carrier", counting, "TCP, counted"))

    host = lmplug.PluginHost.from_environment({})
    host.register(Carrier(), "carrier")
    assert host.resolve_transport("carrier").summary == "TCP, counted"
    assert host.plugins["carrier"].transports == ("carrier",)

    class Clash:
        @tierkit.hookimpl
        def lmplug_register_transports(self, register: Any) -> None:
            register(tierkit.PeerTransport("tcp", counting))

    with pytest.raises(lmplug.PluginContractError, match="both register transport 'tcp'"):
        host.register(Clash(), "clash")
    controller = f"http://127.0.0.1:{free_port()}"
    config = make_config([{"type": "p2p", "controller": controller, "transport": "carrier", "lookup_timeout": 0.05}])
    async with lmplug.open_cache(config, plugins=host) as cache:
        assert await cache.lookup(tokens(5, 1)) == 0  # no controller there: a miss
    assert len(built) == 1


def test_hook_lmplug_register_engine_extensions() -> None:
    """A plugin offers an extension; a config that lists it gets one built from validated options."""

    class Options(tierkit.StrictModel):
        ratio: float = 0.5

    class Doubling(tierkit.EngineExtension):
        def __init__(self, options: Options) -> None:
            self.options = options

        def claim(self, request: Any, computed: int, exact: int, call: Any) -> tierkit.Claim | None:
            return tierkit.Claim(min(2 * exact, len(request.tokens) - 1))

    class Offers:
        @tierkit.hookimpl
        def lmplug_register_engine_extensions(self, register: Any) -> None:
            register(tierkit.EngineExtensionType("doubling", Options, Doubling, "claims twice the prefix"))

    host = lmplug.PluginHost.from_environment({})
    host.register(Offers(), "offers")
    assert host.plugins["offers"].engine_extensions == ("doubling",)
    (built,) = host.build_engine_extensions({"doubling": {"ratio": 0.25}})
    assert isinstance(built, Doubling)
    assert built.name == "doubling"
    assert built.options.ratio == 0.25
    assert built.claim(tierkit.EngineRequest("r", list(range(10))), 0, 3, lambda _: None) == tierkit.Claim(6)
    with pytest.raises(lmplug.ConfigError, match=r"extensions\.doubling\.rate: unknown key"):
        host.build_engine_extensions({"doubling": {"rate": 1}})
    with pytest.raises(lmplug.PluginUnavailable, match="pip install lmplug-absent"):
        host.build_engine_extensions({"absent": {}})

    class Clash:
        @tierkit.hookimpl
        def lmplug_register_engine_extensions(self, register: Any) -> None:
            register(tierkit.EngineExtensionType("doubling", Options, Doubling))

    with pytest.raises(lmplug.PluginContractError, match="both register engine extension 'doubling'"):
        host.register(Clash(), "clash")


async def test_hook_lmplug_chunks_admitted(stack: dict[str, Any]) -> None:
    seen: list[tuple[str, int]] = []

    class Listener:
        @tierkit.hookimpl
        def lmplug_chunks_admitted(self, tier: str, keys: Any) -> None:
            seen.append((tier, len(keys)))

    host = lmplug.PluginHost.from_environment({})
    host.register(Listener(), "listener")
    async with lmplug.open_cache(stack, plugins=host) as cache:
        prompt = tokens(1, 3)
        await cache.store(prompt, reference_kv(prompt, stack))
        assert seen == [("cpu", 3)]  # the test tier "low" reports nothing
        await cache.store(prompt, reference_kv(prompt, stack))
        assert seen == [("cpu", 3)]  # held already: nothing new
        await cache.evict(prompt, tiers=["cpu"])
        await cache.retrieve(prompt)  # served by "low", promoted into "cpu"
        assert seen == [("cpu", 3), ("cpu", 3)]


async def test_hook_lmplug_held_keys(stack: dict[str, Any]) -> None:
    """The local tiers a peer tier serves from list what they hold, and a watcher follows them."""
    events: list[tuple[str, str, int]] = []

    class Watcher:
        def admitted(self, tier: str, keys: Any) -> None:
            events.append(("admitted", tier, len(keys)))

        def evicted(self, tier: str, keys: Any) -> None:
            events.append(("evicted", tier, len(keys)))

    async with lmplug.open_cache(stack) as cache:
        low = cache.pipeline.slots[1].tier
        local = low.context.local_tiers()  # as the "low" tier sees the others: the cpu tier
        assert local.names == ("cpu",)
        stop = low.context.watch(Watcher())
        prompt = tokens(4, 2)
        await cache.store(prompt, reference_kv(prompt, stack))
        assert await local.held_keys() == {"cpu": cache.keys(prompt)}
        assert await local.contains(cache.keys(prompt)) == 2
        chunks = await local.retrieve(cache.keys(prompt))
        assert [chunk.num_tokens for chunk in chunks] == [CHUNK, CHUNK]
        for chunk in chunks:
            chunk.release()
        await cache.evict(prompt, tiers=["cpu"])
        stop()
        await cache.store(prompt, reference_kv(prompt, stack))
    assert events == [("admitted", "cpu", 2), ("evicted", "cpu", 2)]


async def test_hook_lmplug_contains(stack: dict[str, Any]) -> None:
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(2, 4)
        await cache.store(prompt, reference_kv(prompt, stack))
        # The first two chunks only in L1, the last two only below it: still contiguous.
        await cache.evict(prompt[: 2 * CHUNK], tiers=["low"])
        keys = cache.keys(prompt)
        await cache.pipeline.slots[0].evict(keys[2:])
        assert await cache.pipeline.slots[0].contains(keys) == 2
        assert await cache.pipeline.slots[1].contains(keys) == 0
        assert await cache.lookup(prompt) == 4 * CHUNK


async def test_hook_lmplug_retrieve(stack: dict[str, Any]) -> None:
    """Waterfall: a hit below L1 is served and promoted into L1."""
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(3, 3)
        kv = reference_kv(prompt, stack)
        await cache.store(prompt, kv)
        await cache.evict(prompt, tiers=["cpu"])
        low = cache.pipeline.slots[1].tier
        before = low.calls.get("retrieve", 0)  # type: ignore[attr-defined]
        out, count = await cache.retrieve(prompt)
        assert count == 3 * CHUNK
        assert torch.equal(out, kv)
        assert low.calls["retrieve"] == before + 1  # type: ignore[attr-defined]
        assert await cache.pipeline.slots[0].contains(cache.keys(prompt)) == 3  # promoted
        await cache.retrieve(prompt)
        assert low.calls["retrieve"] == before + 1  # type: ignore[attr-defined]  # served by L1 now


async def test_hook_lmplug_retrieve_into(third_party_plugins: Path) -> None:
    """The first tier writes into the caller's buffer; chunks of the tiers below are copied in."""
    config = make_config([{"type": "memo-into", "name": "top"}, {"type": "cpu", "capacity": "1MiB"}], chunk_size=CHUNK)
    async with lmplug.open_cache(config) as cache:
        top = cache.pipeline.slots[0].tier
        prompt = tokens(11, 4)
        kv = reference_kv(prompt, config)
        await cache.store(prompt, kv)
        out = torch.full_like(kv, float("nan"))
        got, count = await cache.retrieve(prompt, out=out)
        assert count == 4 * CHUNK
        assert torch.equal(out, kv)
        assert got.data_ptr() == out.data_ptr()
        assert (top.calls["retrieve_into"], top.calls.get("retrieve", 0)) == (1, 0)  # type: ignore[attr-defined]
        # Chunk 2 only below the first tier, chunk 3 only in it: chunk 2 is copied in from the cpu
        # tier's chunk and promoted into the first tier, then chunk 3 comes from the first tier.
        keys = cache.keys(prompt)
        await cache.pipeline.slots[0].evict(keys[2:3])
        await cache.pipeline.slots[1].evict(keys[3:4])
        out.fill_(float("nan"))
        got, count = await cache.retrieve(prompt, out=out)
        assert count == 4 * CHUNK
        assert torch.equal(out, kv)
        assert top.calls["retrieve_into"] == 3  # type: ignore[attr-defined]
        assert await cache.pipeline.slots[0].contains(keys) == 4  # promoted
        # Without out=, the first tier hands out chunks as usual.
        got, count = await cache.retrieve(prompt)
        assert (count, top.calls["retrieve"]) == (4 * CHUNK, 1)  # type: ignore[attr-defined]
        assert torch.equal(got, kv)


async def test_a_tier_that_answers_retrieve_into_out_of_range_is_a_miss(third_party_plugins: Path) -> None:
    config = make_config([{"type": "memo-into", "name": "top"}], chunk_size=CHUNK)
    async with lmplug.open_cache(config) as cache:
        prompt = tokens(12, 2)
        await cache.store(prompt, reference_kv(prompt, config))
        cache.pipeline.slots[0].tier.corrupt = True  # type: ignore[attr-defined]
        out = torch.zeros_like(reference_kv(prompt, config))
        _, count = await cache.retrieve(prompt, out=out)
        assert count == 0
        text = cache.metrics.render().decode()
        assert 'lmplug_tier_errors_total{operation="retrieve",tier="top"} 1.0' in text


async def test_hook_lmplug_push(third_party_plugins: Path) -> None:
    """Cache.push sends the leading cached chunks, the trailing partial one included, through the
    tier that can push; a failing push is 0 and reported, a cache without such a tier is told so."""
    from lmplug_memo import PUSHED  # type: ignore[import-not-found]

    config = make_config(
        [{"type": "cpu", "capacity": "1MiB"}, {"type": "memo-push", "name": "pd"}], chunk_size=CHUNK,
        save_partial_chunks=True,
    )  # fmt: skip
    async with lmplug.open_cache(config) as cache:
        prompt = tokens(13, 3)[: 2 * CHUNK + 5]
        kv = reference_kv(prompt, config)
        await cache.store(prompt, kv)
        assert await cache.push(prompt, destination="decode-0", transfer_id="t1", timeout=5.0) == 2 * CHUNK + 5
        keys = cache.keys(prompt)
        assert list(PUSHED["decode-0"]) == keys
        assert torch.equal(torch.cat([PUSHED["decode-0"][key] for key in keys], dim=2), kv)
        # Only what is cached goes: the prompt's third chunk extended is not.
        longer = prompt + [7] * 20
        assert await cache.push(longer, destination="decode-1", transfer_id="t2", timeout=5.0) == 2 * CHUNK
        assert await cache.push(prompt, destination="unreachable", transfer_id="t3", timeout=5.0) == 0
        assert 'lmplug_tier_errors_total{operation="push",tier="pd"} 1.0' in cache.metrics.render().decode()
    async with lmplug.open_cache(make_config([{"type": "cpu", "capacity": "1MiB"}], chunk_size=CHUNK)) as cache:
        with pytest.raises(lmplug.ConfigError, match="no tier of this cache can push"):
            await cache.push(prompt, destination="decode-0", transfer_id="t4", timeout=5.0)
        assert await cache.transfer_state("t1") is None  # no tier receives pushes here


async def test_hook_lmplug_transfer_state(third_party_plugins: Path) -> None:
    """Cache.transfer_state asks the tier that pushes (and receives); an answer outside the
    contract is reported and taken as unknown."""
    from lmplug_memo import STATES  # type: ignore[import-not-found]

    STATES.clear()  # this test runs once per event loop
    config = make_config([{"type": "cpu", "capacity": "1MiB"}, {"type": "memo-push", "name": "pd"}], chunk_size=CHUNK)
    async with lmplug.open_cache(config) as cache:
        prompt = tokens(14, 2)
        await cache.store(prompt, reference_kv(prompt, config))
        assert await cache.transfer_state("s1") is None
        await cache.push(prompt, destination="decode-2", transfer_id="s1", timeout=5.0)
        assert await cache.transfer_state("s1") == "completed"
        await cache.push(prompt + [5] * CHUNK, destination="decode-2", transfer_id="s2", timeout=5.0)
        assert await cache.transfer_state("s2") == "failed"  # the third chunk was not cached
        STATES["s3"] = "lost"
        assert await cache.transfer_state("s3") is None
        assert 'lmplug_tier_errors_total{operation="transfer_state",tier="pd"} 1.0' in cache.metrics.render().decode()


async def test_hook_lmplug_store(stack: dict[str, Any]) -> None:
    """Write-all: every tier gets the chunks."""
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(4, 2)
        await cache.store(prompt, reference_kv(prompt, stack))
        keys = cache.keys(prompt)
        for slot in cache.pipeline.slots:
            assert await slot.contains(keys) == 2


async def test_a_store_never_asks_a_write_behind_tier_what_it_holds(third_party_plugins: Path) -> None:
    """Its contains may be a network round trip on the engine's path; its own store skips duplicates."""
    layers = [{"type": "cpu", "capacity": "1MiB"}, {"type": "memo-behind", "name": "low"}]
    config = make_config(layers, chunk_size=CHUNK)
    async with lmplug.open_cache(config) as cache:
        low = cache.pipeline.slots[1].tier
        prompt = tokens(11, 2)
        kv = reference_kv(prompt, config)
        for _ in range(2):
            assert await cache.store(prompt, kv) == 2 * CHUNK  # the second: L1 holds both, nothing is offered
        await cache.evict(prompt, tiers=["cpu"])
        assert await cache.store(prompt, kv) == 2 * CHUNK  # L1 lacks them: offered to every tier again
        assert low.calls.get("contains", 0) == 0  # type: ignore[attr-defined]
        assert low.calls["store"] == 2  # type: ignore[attr-defined]
        assert len(low.data) == 2  # type: ignore[attr-defined]


async def test_a_stack_of_write_behind_tiers_is_offered_every_chunk(third_party_plugins: Path) -> None:
    config = make_config([{"type": "memo-behind", "name": "low"}], chunk_size=CHUNK)
    async with lmplug.open_cache(config) as cache:
        low = cache.pipeline.slots[0].tier
        prompt = tokens(12, 2)
        kv = reference_kv(prompt, config)
        for _ in range(2):
            assert await cache.store(prompt, kv) == 2 * CHUNK
        assert low.calls.get("contains", 0) == 0  # type: ignore[attr-defined]
        assert low.calls["store"] == 2  # type: ignore[attr-defined]
        assert await cache.lookup(prompt) == 2 * CHUNK


async def test_hook_lmplug_evict(stack: dict[str, Any]) -> None:
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(5, 2)
        await cache.store(prompt, reference_kv(prompt, stack))
        assert await cache.evict(prompt, tiers=["low"]) == {"low": 2}
        assert await cache.evict(prompt) == {"cpu": 2, "low": 0}
        assert await cache.lookup(prompt) == 0


async def test_hook_lmplug_transfer(stack: dict[str, Any]) -> None:
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(6, 2)
        kv = reference_kv(prompt, stack)
        keys = cache.keys(prompt)
        chunks = []
        for index in range(2):
            chunk = cache.allocator.allocate(CHUNK)
            assert chunk is not None
            chunk.tensor.copy_(kv[:, :, index * CHUNK : (index + 1) * CHUNK])
            chunks.append(chunk)
        assert await cache.pipeline.slots[0].transfer(keys, chunks, "low") == 2
        for chunk in chunks:
            chunk.release()
        out, count = await cache.retrieve(prompt)
        assert count == 2 * CHUNK
        assert torch.equal(out, kv)


# --------------------------------------------------------------------------- degraded tiers


async def test_a_failing_lower_tier_is_a_miss_not_an_error(stack: dict[str, Any]) -> None:
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(7, 2)
        await cache.store(prompt, reference_kv(prompt, stack))
        await cache.evict(prompt, tiers=["cpu"])
        cache.pipeline.slots[1].tier.failing.update({"contains", "retrieve"})  # type: ignore[attr-defined]
        assert await cache.lookup(prompt) == 0
        _, count = await cache.retrieve(prompt)
        assert count == 0
        text = cache.metrics.render().decode()
        assert 'lmplug_tier_errors_total{operation="retrieve",tier="low"} 1.0' in text


async def test_a_failing_tier_does_not_stop_the_others_storing(
    stack: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with lmplug.open_cache(stack) as cache:
        cache.pipeline.slots[1].tier.failing.update({"store", "contains"})  # type: ignore[attr-defined]
        prompt = tokens(8, 2)
        kv = reference_kv(prompt, stack)
        for _ in range(3):
            await cache.store(prompt, kv)
        out, count = await cache.retrieve(prompt)
        assert torch.equal(out, kv)
        assert count == 2 * CHUNK
    warnings = [r for r in caplog.records if "failed to store" in r.getMessage()]
    assert len(warnings) == 1  # reported once, not on every call
    assert "TierUnavailable" in warnings[0].getMessage()


async def test_corrupt_kv_from_a_tier_is_dropped_never_served(stack: dict[str, Any]) -> None:
    async with lmplug.open_cache(stack) as cache:
        prompt = tokens(9, 2)
        await cache.store(prompt, reference_kv(prompt, stack))
        await cache.evict(prompt, tiers=["cpu"])
        cache.pipeline.slots[1].tier.corrupt = True  # type: ignore[attr-defined]
        _, count = await cache.retrieve(prompt)
        assert count == 0
        assert cache.allocator.statistics().used_bytes == 0  # the rejected chunks were released
        assert 'lmplug_tier_errors_total{operation="retrieve",tier="low"} 1.0' in cache.metrics.render().decode()


async def test_a_slow_tier_serves_correct_kv(third_party_plugins: Path) -> None:
    config = make_config([{"type": "memo", "latency": "5ms"}], chunk_size=CHUNK)
    async with lmplug.open_cache(config) as cache:
        prompt = tokens(10, 2)
        await cache.store(prompt, reference_kv(prompt, config))
        out, count = await cache.retrieve(prompt)
        assert torch.equal(out, reference_kv(prompt, config))
        assert count == 2 * CHUNK
        assert isinstance(cache.allocator, HeapAllocator)  # no tier provides a pool
