"""The package stands alone (no lmplug, no torch), registers ``lmplug controller``, and its
README documents every option with its real default."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from lmplug_controller.cli import add_arguments

README = Path(__file__).parents[1] / "README.md"


def test_the_service_and_the_client_load_neither_lmplug_nor_torch() -> None:
    script = (
        "import sys, lmplug_controller.server, lmplug_controller.http, lmplug_controller.client\n"
        "import lmplug_controller.cli, lmplug_controller.testing\n"
        "print(sorted(name for name in ('torch', 'lmplug') if name in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_lmplug_gets_a_controller_command() -> None:
    from lmplug.tierkit import CliCommand
    from lmplug_controller import command

    registered: list[CliCommand] = []
    command.lmplug_register_commands(register=registered.append)
    (controller,) = registered
    parser = argparse.ArgumentParser()
    controller.configure(parser)
    assert controller.name == "controller"
    assert parser.parse_args(["--port", "9100"]).port == 9100


def _section(heading: str) -> str:
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_has_the_plugin_headings_in_order() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), re.MULTILINE)
    assert headings == ["What it is", "Install", "Configuration", "Capabilities", "Hardware", "Metrics"]


def test_the_configuration_table_lists_every_option_with_its_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    options.discard("--help")
    rows = re.findall(r"^\| `(--[\w-]+)` \| `([^`]+)` \|", _section("Configuration"), re.MULTILINE)
    assert {option for option, _ in rows} == options
    defaults = parser.parse_args([])
    for option, default in rows:
        assert str(getattr(defaults, option[2:].replace("-", "_"))) == default, option


def test_the_readme_names_every_metric() -> None:
    from lmplug_controller.metrics import ControllerCollector
    from lmplug_controller.server import Controller, ControllerConfig

    names = {metric.name for metric in ControllerCollector(Controller(ControllerConfig(port=0))).collect()}
    documented = set(re.findall(r"`(lmplug_controller_\w+)`", _section("Metrics")))
    assert names <= documented
