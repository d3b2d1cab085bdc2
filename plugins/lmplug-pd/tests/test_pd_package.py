"""The proxy stands alone (no lmplug, no torch), registers ``lmplug pd-proxy``, reads its
instances as documented, and its README documents every option with its default and every metric."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmplug.testing import PLUGIN_README_HEADINGS, readme_headings
from lmplug_pd.cli import add_arguments, config_from_arguments
from lmplug_pd.metrics import ProxyMetrics
from lmplug_pd.params import decode_body, prefill_body
from lmplug_pd.proxy import ProxyConfig

README = Path(__file__).parents[1] / "README.md"


def test_the_proxy_loads_neither_lmplug_nor_torch() -> None:
    script = (
        "import sys, lmplug_pd.proxy, lmplug_pd.cli\n"
        "print(sorted(name for name in ('torch', 'lmplug') if name in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_lmplug_gets_a_pd_proxy_command() -> None:
    from lmplug.tierkit import CliCommand
    from lmplug_pd import command

    registered: list[CliCommand] = []
    command.lmplug_register_commands(register=registered.append)
    (proxy,) = registered
    parser = argparse.ArgumentParser()
    proxy.configure(parser)
    assert proxy.name == "pd-proxy"
    args = parser.parse_args(
        ["--prefill", "http://a:1,http://b:2/", "--decode", "http://c:3", "--decode", "http://d:4"]
    )
    config = config_from_arguments(args)
    assert config.prefill == ("http://a:1", "http://b:2")
    assert config.decode == ("http://c:3", "http://d:4")
    assert config.receivers == {}
    args = parser.parse_args(["--prefill", "http://a:1", "--decode", "http://c:3=10.0.0.3:7301,http://d:4/"])
    config = config_from_arguments(args)
    assert (config.decode, config.receivers) == (("http://c:3", "http://d:4"), {"http://c:3": "10.0.0.3:7301"})


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"prefill": ()}, "at least one prefill"),
        ({"decode": ("http://d:1/",)}, "write it as 'http://d:1'"),
        ({"decode_timeout": 0}, "decode_timeout"),
        ({"port": 70000}, "port"),
        ({"max_body": 0}, "max_body"),
        ({"receivers": {"http://x:1": "h:1"}}, "is not a decode instance"),
        ({"receivers": {"http://d:1": "http://h:1"}}, "must be HOST:PORT"),
        ({"receivers": {"http://d:1": "h:0"}}, "must be HOST:PORT"),
    ],
)
def test_the_config_refuses_values_out_of_range(changes: dict[str, object], words: str) -> None:
    settings: dict[str, object] = {"prefill": ("http://p:1",), "decode": ("http://d:1",), **changes}
    with pytest.raises(ValueError, match=re.escape(words)):
        ProxyConfig(**settings)  # type: ignore[arg-type]


def test_the_prefill_body_leaves_the_clients_body_alone() -> None:
    body = {"prompt": "x", "max_tokens": 9, "stream": True, "min_tokens": 2}
    prefill_body(body, xfer_id="x", decode="http://d:1", deadline_ms=5)
    decode_body(body, xfer_id="x", prefill="http://p:1", wait_ms=5)
    assert body == {"prompt": "x", "max_tokens": 9, "stream": True, "min_tokens": 2}


def _section(heading: str) -> str:
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_has_the_plugin_headings_in_order() -> None:
    assert tuple(readme_headings(README.read_text())) == PLUGIN_README_HEADINGS


def test_the_configuration_table_lists_every_option_with_its_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    options.discard("--help")
    rows = re.findall(r"^\| `(--[\w-]+)` \| `([^`]+)` \|", _section("Configuration"), re.MULTILINE)
    assert {option for option, _ in rows} == options
    defaults = parser.parse_args(["--prefill", "http://p:1", "--decode", "http://d:1"])
    for option, default in rows:
        if option in ("--prefill", "--decode"):
            assert default == "required", option
            continue
        value = getattr(defaults, option[2:].replace("-", "_"))
        assert (f"{value:g}" if isinstance(value, float) else str(value)) == default, option


def test_the_readme_names_every_metric() -> None:
    metrics = ProxyMetrics(["http://p:1"], ["http://d:1"])
    names = {metric.name for metric in metrics.registry.collect()}
    documented = set(re.findall(r"`(lmplug_pd_proxy_\w+)`", _section("Metrics")))
    assert names == documented
