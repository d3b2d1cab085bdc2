"""The package stands alone: no lmplug, no torch; its README documents every option."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmplug_server.cli import add_arguments, parse_size

README = Path(__file__).parents[1] / "README.md"


def test_importing_the_server_loads_neither_lmplug_nor_torch() -> None:
    script = (
        "import sys, lmplug_server, lmplug_server.server, lmplug_server.cli\n"
        "print(sorted(name for name in ('torch', 'lmplug') if name in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def _section(heading: str) -> str:
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_has_the_plugin_headings_in_order() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), re.MULTILINE)
    assert headings == ["What it is", "Install", "Configuration", "Capabilities", "Hardware", "Metrics"]


def test_the_configuration_table_lists_every_option() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    options.discard("--help")
    documented = set(re.findall(r"^\| `(--[\w-]+)` \|", _section("Configuration"), re.MULTILINE))
    assert documented == options


def test_the_configuration_table_gives_the_real_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    for option, default in re.findall(r"^\| `(--[\w-]+)` \| `([^`]+)` \|", _section("Configuration"), re.MULTILINE):
        value = getattr(defaults, option[2:].replace("-", "_"))
        assert str(value) == default or value == parse_size(default), option


@pytest.mark.parametrize(
    ("text", "size"), [("4GiB", 4 << 30), ("512 MB", 512_000_000), ("1048576", 1 << 20), ("1.5KiB", 1536)]
)
def test_sizes_read_like_lmplug_configs(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "4 parsecs", "-1GiB", "0.5B"])
def test_a_bad_size_is_refused_with_the_units_named(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
