"""Plugin loading: entry points, switches, failures, and the tier contract."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lmplug
from lmplug import tierkit
from lmplug.errors import ConfigError, PluginContractError, PluginError, PluginUnavailable
from lmplug.hooks.manager import PluginHost
from lmplug.testing import TierConformance, make_config, reference_kv


def test_entry_point_plugins_are_found_with_their_distribution(third_party_plugins: Path) -> None:
    host = PluginHost.from_environment({})
    memo = host.plugins["memo"]
    assert (memo.distribution, memo.version, memo.error) == ("lmplug-memo", "0.1.0", None)
    assert memo.tier_types == ("memo", "memo-into", "memo-behind", "memo-push")
    assert "lmplug_register_tier_types" in memo.hooks
    assert host.plugins["cpu"].distribution == "lmplug-cpu"
    assert "memo" in host.tier_types


async def test_a_third_party_tier_composes_into_a_stack(third_party_plugins: Path) -> None:
    config = make_config([{"type": "cpu", "capacity": "1MiB"}, {"type": "memo", "name": "shared", "latency": "1ms"}])
    async with lmplug.open_cache(config) as cache:
        assert [slot.name for slot in cache.pipeline.slots] == ["cpu", "shared"]
        tokens = list(range(40))
        await cache.store(tokens, reference_kv(tokens, config))
        memo = cache.pipeline.slots[1].tier
        assert len(memo.data) == 2  # type: ignore[attr-defined]


def test_allow_list_limits_what_loads(third_party_plugins: Path) -> None:
    assert set(PluginHost.from_environment({"LMPLUG_PLUGINS": "cpu"}).plugins) == {"cpu"}
    assert set(PluginHost.from_environment({"LMPLUG_PLUGINS": " memo , cpu "}).plugins) == {"cpu", "memo"}
    assert PluginHost.from_environment({"LMPLUG_PLUGINS": ""}).plugins == {}


def test_autoload_can_be_disabled(third_party_plugins: Path) -> None:
    assert PluginHost.from_environment({"LMPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}).plugins == {}


def test_tracing_logs_composition_hook_calls(third_party_plugins: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lmplug.plugins"):
        PluginHost.from_environment({"LMPLUG_TRACE_PLUGINS": "1", "LMPLUG_PLUGINS": "memo"})
    assert any("lmplug_register_tier_types" in record.getMessage() for record in caplog.records)


def test_a_broken_unconfigured_plugin_is_reported_not_fatal(
    third_party_plugins: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lmplug.plugins"):
        host = PluginHost.from_environment({})
    broken = host.plugins["broken"]
    assert broken.error is not None
    assert "libbroken.so.1" in broken.error
    assert any("broken" in record.getMessage() for record in caplog.records)


async def test_a_configured_tier_whose_plugin_is_broken_fails_startup(third_party_plugins: Path) -> None:
    with pytest.raises(PluginUnavailable) as info:
        async with lmplug.open_cache(make_config([{"type": "broken"}])):
            pass
    message = str(info.value)
    assert "lmplug-broken 0.1.0" in message
    assert "libbroken.so.1" in message


async def test_a_tier_type_nobody_provides_names_the_package_to_install() -> None:
    with pytest.raises(PluginUnavailable, match="pip install lmplug-gds"):
        async with lmplug.open_cache(make_config([{"type": "gds"}])):
            pass


class _TierTypes:
    """A plugin object offering a given tier type (for contract tests)."""

    def __init__(self, tier_type: tierkit.TierType[Any]) -> None:
        self.tier_type = tier_type

    @tierkit.hookimpl
    def lmplug_register_tier_types(self, register: Any) -> None:
        register(self.tier_type)


def _host_with(tier_type: tierkit.TierType[Any]) -> PluginHost:
    host = PluginHost.from_environment({"LMPLUG_PLUGINS": "cpu"})
    host.register(_TierTypes(tier_type), "contract-test")
    return host


def test_two_plugins_offering_one_tier_type_is_an_error() -> None:
    from lmplug_cpu import CpuTier, CpuTierConfig

    with pytest.raises(PluginContractError, match="both register tier type 'cpu'"):
        _host_with(tierkit.TierType("cpu", CpuTierConfig, CpuTier))


async def test_a_factory_must_return_a_tier() -> None:
    host = _host_with(tierkit.TierType("odd", tierkit.StrictModel, lambda context, options: object()))  # type: ignore[arg-type, return-value]
    with pytest.raises(PluginContractError, match=r"returned object, not an lmplug\.tierkit\.Tier"):
        async with lmplug.open_cache(make_config([{"type": "odd"}]), plugins=host):
            pass


class _Unmarked(tierkit.Tier):
    """Implements every hook but forgot @tierkit.hookimpl on evict."""

    @tierkit.hookimpl
    async def lmplug_contains(self, keys: Any) -> int:
        return 0

    @tierkit.hookimpl
    async def lmplug_retrieve(self, keys: Any) -> list[tierkit.KVChunk]:
        return []

    @tierkit.hookimpl
    async def lmplug_store(self, keys: Any, chunks: Any) -> None:
        return None

    async def lmplug_evict(self, keys: Any) -> int:
        return 0

    def statistics(self) -> tierkit.TierStatistics:
        return tierkit.TierStatistics(self.name, "unmarked", 0, 0, None)


class _WrongSignature(_Unmarked):
    @tierkit.hookimpl
    async def lmplug_evict(self, keys: Any, everything: bool) -> int:  # type: ignore[override]
        return 0


class _SyncEvict(_Unmarked):
    @tierkit.hookimpl
    def lmplug_evict(self, keys: Any) -> int:  # type: ignore[override]
        return 0


async def test_a_data_path_hook_that_is_not_async_is_a_contract_error() -> None:
    host = _host_with(tierkit.TierType("sync", tierkit.StrictModel, lambda c, o: _SyncEvict(c)))
    with pytest.raises(PluginContractError, match="lmplug_evict must be an async method"):
        async with lmplug.open_cache(make_config([{"type": "sync"}]), plugins=host):
            pass


class _AsyncComposition:
    @tierkit.hookimpl
    async def lmplug_register_tier_types(self, register: Any) -> None:
        return None


class _ModuleLevelDataPath:
    @tierkit.hookimpl
    async def lmplug_store(self, keys: Any, chunks: Any) -> None:
        return None


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_AsyncComposition(), "synchronous composition hook; it must not be async"),
        (_ModuleLevelDataPath(), "implement it as an async method of the tier object"),
    ],
)
def test_hooks_of_the_wrong_colour_fail_the_plugin(plugin: object, message: str) -> None:
    host = PluginHost.from_environment({"LMPLUG_PLUGINS": ""})
    host.register(plugin, "colour")
    error = host.plugins["colour"].error
    assert error is not None
    assert message in error
    assert host.pm.get_plugin("colour") is None


async def test_a_tier_hook_without_the_marker_is_a_contract_error() -> None:
    host = _host_with(tierkit.TierType("unmarked", tierkit.StrictModel, lambda c, o: _Unmarked(c)))
    with pytest.raises(PluginContractError, match="does not implement lmplug_evict"):
        async with lmplug.open_cache(make_config([{"type": "unmarked"}]), plugins=host):
            pass


async def test_a_tier_hook_with_the_wrong_signature_is_a_contract_error() -> None:
    host = _host_with(tierkit.TierType("wrong", tierkit.StrictModel, lambda c, o: _WrongSignature(c)))
    with pytest.raises(PluginContractError, match="breaks the hook contract"):
        async with lmplug.open_cache(make_config([{"type": "wrong"}]), plugins=host):
            pass


class _IntoUndeclared(_Unmarked):
    """Implements lmplug_retrieve_into but does not declare the capability."""

    @tierkit.hookimpl
    async def lmplug_evict(self, keys: Any) -> int:
        return 0

    @tierkit.hookimpl
    async def lmplug_retrieve_into(self, keys: Any, out: Any) -> int:
        return 0


class _IntoMissing(_IntoUndeclared):
    """Declares the capability; its lmplug_retrieve_into lacks the marker."""

    capabilities = frozenset({tierkit.Capability.RETRIEVE_INTO})

    async def lmplug_retrieve_into(self, keys: Any, out: Any) -> int:
        return 0


@pytest.mark.parametrize(
    ("tier_class", "message"),
    [
        (_IntoUndeclared, "implements lmplug_retrieve_into without declaring Capability.RETRIEVE_INTO"),
        (_IntoMissing, "declares Capability.RETRIEVE_INTO but does not implement lmplug_retrieve_into"),
    ],
)
async def test_an_optional_hook_goes_with_its_capability(tier_class: type[tierkit.Tier], message: str) -> None:
    host = _host_with(tierkit.TierType("into", tierkit.StrictModel, lambda c, o: tier_class(c)))
    with pytest.raises(PluginContractError, match=message):
        async with lmplug.open_cache(make_config([{"type": "into"}]), plugins=host):
            pass
    assert host.pm.get_plugins() == {host.pm.get_plugin(name) for name in host.plugins}  # no tier objects


async def test_two_caches_share_one_plugin_host() -> None:
    """The host's manager holds plugins only: tiers are checked on managers of their own."""
    host = PluginHost.from_environment({"LMPLUG_PLUGINS": "cpu"})
    config = make_config([{"type": "cpu", "capacity": "1MiB"}])
    tokens = list(range(64))
    async with lmplug.open_cache(config, plugins=host) as first, lmplug.open_cache(config, plugins=host) as second:
        await first.store(tokens, reference_kv(tokens, config))
        assert await first.lookup(tokens) == 64
        assert await second.lookup(tokens) == 0  # each has its own host memory
        assert host.pm.get_plugins() == {host.pm.get_plugin(name) for name in host.plugins}
    async with lmplug.open_cache(config, plugins=host) as again:  # and the host outlives them
        assert await again.lookup(tokens) == 0


def test_two_sync_caches_with_one_config_open_side_by_side() -> None:
    config = make_config([{"type": "cpu", "capacity": "1MiB"}])
    tokens = list(range(64))
    with lmplug.SyncCache(config) as first, lmplug.SyncCache(config) as second:
        first.store(tokens, reference_kv(tokens, config))
        second.store(tokens[:32], reference_kv(tokens[:32], config))
        assert (first.lookup(tokens), second.lookup(tokens)) == (64, 32)


async def test_a_factory_that_crashes_is_a_plugin_error() -> None:
    def crash(context: tierkit.TierContext, options: tierkit.StrictModel) -> tierkit.Tier:
        raise OSError("no such device")

    host = _host_with(tierkit.TierType("crashy", tierkit.StrictModel, crash))
    with pytest.raises(PluginError, match=r"could not build tier 'crashy'.*OSError: no such device"):
        async with lmplug.open_cache(make_config([{"type": "crashy"}]), plugins=host):
            pass


async def test_tier_options_of_a_third_party_plugin_are_validated(third_party_plugins: Path) -> None:
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.latency"):
        async with lmplug.open_cache(make_config([{"type": "cpu"}, {"type": "memo", "latency": "a while"}])):
            pass


def test_importing_lmplug_loads_no_plugin() -> None:
    code = "import sys, lmplug; print(sorted(m for m in sys.modules if m.startswith('lmplug_')))"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


class TestMemoTierConformance(TierConformance):
    """The throwaway plugin passes the conformance suite a real plugin runs."""

    @pytest.fixture
    def tier_entry(self, third_party_plugins: Path) -> dict[str, Any]:
        return {"type": "memo"}


# ----------------------------------------------------------------------------- the CLI


def _lmplug(*args: str, site: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LMPLUG_")}
    environ.update(env)
    if site is not None:
        environ["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-m", "lmplug.cli", *args], capture_output=True, text=True, env=environ, check=False
    )


def test_cli_lists_plugins_versions_and_hooks(plugin_site: Path) -> None:
    result = _lmplug("plugins", site=plugin_site)
    assert result.returncode == 0, result.stderr
    assert "cpu  (lmplug-cpu 0.1.0)" in result.stdout
    assert "tier types: memo" in result.stdout
    assert "      cpu: " in result.stdout  # each tier type's summary
    assert "lmplug_register_commands" in result.stdout
    assert "FAILED TO LOAD: ImportError: libbroken.so.1" in result.stdout


def test_cli_plugin_listing_honours_switches(plugin_site: Path) -> None:
    only_cpu = json.loads(_lmplug("plugins", "--json", site=plugin_site, LMPLUG_PLUGINS="cpu").stdout)
    assert [plugin["name"] for plugin in only_cpu] == ["cpu"]
    none = _lmplug("plugins", site=plugin_site, LMPLUG_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "no lmplug plugins installed" in none.stdout


def test_cli_runs_commands_that_plugins_add(plugin_site: Path) -> None:
    result = _lmplug("memo-info", "hello", site=plugin_site)
    assert (result.returncode, result.stdout.strip()) == (0, "memo plugin says hello")


def test_cli_config_check_accepts_a_good_file(config_file: Path) -> None:
    result = _lmplug("config", "check", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "tiers[0] cpu (type cpu): capacity=1073741824" in result.stdout


def test_cli_config_check_names_the_bad_key(tmp_path: Path, config_file: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_file.read_text().replace("eviction: lru", "evicton: lru"))
    result = _lmplug("config", "check", str(bad))
    assert result.returncode == 2
    assert "tiers[0].evicton: unknown key" in result.stderr


def test_cli_config_check_names_a_missing_plugin(tmp_path: Path, config_file: Path) -> None:
    bad = tmp_path / "gds.yaml"
    bad.write_text(config_file.read_text().replace("type: cpu", "type: gds"))
    result = _lmplug("config", "check", str(bad))
    assert result.returncode == 2
    assert "pip install lmplug-gds" in result.stderr


def test_reference_kv_is_prefix_dependent() -> None:
    config = make_config()
    a = reference_kv([1, 2, 3], config)
    b = reference_kv([9, 2, 3], config)
    assert not torch.equal(a[:, :, 1:], b[:, :, 1:])
