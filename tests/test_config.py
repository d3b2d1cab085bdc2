from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

import lmplug
from lmplug.core.config import load_config
from lmplug.core.units import parse_duration, parse_size
from lmplug.errors import ConfigError
from lmplug.testing import make_config

YAML = """
chunk_size: 32
hash_algorithm: xxh3_128
namespace: tenant-a
model:
  name: tiny-llama
  num_layers: 4
  num_kv_heads: 2
  head_size: 64
  dtype: bfloat16
tiers:
  - type: cpu
    capacity: 64MiB
    eviction: lfu
"""


def test_yaml_file_is_parsed_into_typed_models(tmp_path: Path) -> None:
    path = tmp_path / "lmplug.yaml"
    path.write_text(YAML)
    config = load_config(path, environ={})
    assert config.chunk_size == 32
    assert config.hash_algorithm == "xxh3_128"
    assert config.model.num_layers == 4
    assert config.tiers[0].tier_name == "cpu"
    assert config.tiers[0].options == {"capacity": "64MiB", "eviction": "lfu"}


def test_path_comes_from_lmplug_config(tmp_path: Path) -> None:
    path = tmp_path / "lmplug.yaml"
    path.write_text(YAML)
    assert load_config(None, environ={"LMPLUG_CONFIG": str(path)}).model.name == "tiny-llama"


def test_missing_lmplug_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="LMPLUG_CONFIG is not set"):
        load_config(None, environ={})


def test_defaults() -> None:
    config = load_config({"model": make_config()["model"], "tiers": [{"type": "cpu"}]}, environ={})
    assert config.chunk_size == 256
    assert config.save_partial_chunks is False
    assert config.hash_algorithm == "blake3"
    assert config.lease_timeout == 300.0
    assert (config.world_size, config.rank, config.namespace) == (1, 0, None)


def test_environment_overrides_nested_keys_and_list_entries(tmp_path: Path) -> None:
    path = tmp_path / "lmplug.yaml"
    path.write_text(YAML)
    env = {
        "LMPLUG_CHUNK_SIZE": "64",
        "LMPLUG_MODEL__NUM_LAYERS": "8",
        "LMPLUG_TIERS__0__CAPACITY": "1GiB",
        "LMPLUG_SAVE_PARTIAL_CHUNKS": "true",
        "LMPLUG_PLUGINS": "cpu",  # a switch, not a config key
    }
    config = load_config(path, environ=env)
    assert config.chunk_size == 64
    assert config.model.num_layers == 8
    assert config.save_partial_chunks is True
    assert config.tiers[0].options["capacity"] == "1GiB"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda c: c.update(chunk_sise=4), "chunk_sise: unknown key"),
        (lambda c: c["model"].update(layers=4), "model.layers: unknown key"),
        (lambda c: c.update(chunk_size=0), "chunk_size: Input should be greater than 0"),
        (lambda c: c["model"].update(dtype="float64"), "model.dtype"),
        (lambda c: c.update(tiers=[]), "tiers: List should have at least 1 item"),
        (lambda c: c["tiers"][0].pop("type"), "tiers[0].type: Field required"),
        (lambda c: c.update(lease_timeout="soon"), "lease_timeout"),
    ],
)
def test_bad_keys_are_named_by_path(mutate: Any, path: str) -> None:
    config = make_config()
    mutate(config)
    with pytest.raises(ConfigError) as info:
        load_config(config, environ={})
    assert path in str(info.value)


def test_unknown_key_under_an_overridden_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.num_layrs: unknown key"):
        load_config(make_config(), environ={"LMPLUG_MODEL__NUM_LAYRS": "4"})


def test_bad_environment_value_of_a_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="chunk_size: Input should be"):
        load_config(make_config(), environ={"LMPLUG_CHUNK_SIZE": "many"})


def test_variables_that_name_no_config_key_are_left_alone_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Names of this test alone: the warning is once per process.
    venv, backend = f"LMPLUG_VENV_{os.getpid()}", f"LMPLUG_SERVER_BACKEND_{id(caplog)}"
    environ = {venv: "/opt/venv", backend: "trio", "LMPLUG_CHUNK_SIZE": "32"}
    with caplog.at_level(logging.WARNING, logger="lmplug"):
        config = load_config(make_config(), environ=environ)
        again = load_config(make_config(), environ=environ)
    assert config.chunk_size == again.chunk_size == 32
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [record.name for record in warnings] == ["lmplug.config"] * 2
    messages = [record.getMessage() for record in warnings]
    assert sum(backend in message for message in messages) == 1
    assert sum(venv in message for message in messages) == 1


def test_environment_index_out_of_range_is_an_error() -> None:
    with pytest.raises(ConfigError, match="LMPLUG_TIERS__3__CAPACITY"):
        load_config(make_config(), environ={"LMPLUG_TIERS__3__CAPACITY": "1GiB"})


def test_duplicate_tier_names_are_rejected() -> None:
    config = make_config([{"type": "cpu"}, {"type": "cpu"}])
    with pytest.raises(ConfigError, match="both named 'cpu'"):
        load_config(config, environ={})


def test_rank_must_be_below_world_size() -> None:
    with pytest.raises(ConfigError, match="rank 2 is out of range"):
        load_config(make_config(world_size=2, rank=2), environ={})


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(path, environ={})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, environ={})


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read lmplug config"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_typed_config_is_returned_as_is() -> None:
    config = load_config(make_config(), environ={})
    assert load_config(config, environ={"LMPLUG_CHUNK_SIZE": "4"}) is config


def test_config_is_frozen() -> None:
    config = load_config(make_config(), environ={})
    with pytest.raises(ValueError, match="frozen"):
        config.chunk_size = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("8GiB", 8 * 1024**3),
        ("512 MB", 512 * 1000**2),
        ("1.5KiB", 1536),
        ("2mib", 2 * 1024**2),
    ],
)
def test_sizes_accept_units(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "-1", "1.3B", True, [1], "GiB"])
def test_bad_sizes_are_rejected(text: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"), [(30, 30.0), ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0)]
)
def test_durations_accept_units(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


async def test_tier_options_are_validated_by_the_plugin_model() -> None:
    config = make_config([{"type": "cpu", "capacty": "1GiB"}])
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.capacty: unknown key"):
        async with lmplug.open_cache(config):
            pass


async def test_a_capacity_that_cannot_hold_a_chunk_is_rejected() -> None:
    config = make_config([{"type": "cpu", "capacity": "4KiB"}], chunk_size=256)
    with pytest.raises(ConfigError, match="cannot hold one chunk of 256 tokens"):
        async with lmplug.open_cache(config):
            pass


async def test_tier_size_with_bad_unit_is_rejected_with_its_path() -> None:
    config = make_config([{"type": "cpu", "capacity": "lots"}])
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.capacity"):
        async with lmplug.open_cache(config):
            pass


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_stacks_are_valid(path: Path) -> None:
    from lmplug.core.composer import plan_tiers
    from lmplug.hooks.manager import PluginHost

    config = load_config(path, environ={})
    host = PluginHost.from_environment({})
    assert plan_tiers(config, host)
    assert len(host.build_engine_extensions(config.extensions)) == len(config.extensions)


def test_the_cores_own_switches_are_not_config_keys(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"LMPLUG_PLUGINS": "cpu", "LMPLUG_LOG_LEVEL": "INFO", "LMPLUG_DISABLE_PLUGIN_AUTOLOAD": "0"}
    with caplog.at_level(logging.DEBUG, logger="lmplug"):
        config = load_config(make_config(), environ=environ)
    assert config.chunk_size == 16
    assert not caplog.records  # lmplug's own switches: no warning
