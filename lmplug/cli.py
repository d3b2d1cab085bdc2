"""The ``lmplug`` command: ``plugins``, ``config check``, and sub-commands plugins add."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

from lmplug.core.commands import CliCommand
from lmplug.core.composer import plan_tiers
from lmplug.core.config import load_config
from lmplug.errors import LmplugError
from lmplug.hooks.manager import PluginHost


def _plugins(host: PluginHost, args: argparse.Namespace) -> int:
    infos = sorted(host.plugins.values(), key=lambda info: info.name)
    if args.json:
        print(json.dumps([asdict(info) for info in infos], indent=2))
        return 0
    if not infos:
        print("no lmplug plugins installed (or none allowed by LMPLUG_PLUGINS / LMPLUG_DISABLE_PLUGIN_AUTOLOAD)")
        return 0
    for info in infos:
        dist = f"{info.distribution} {info.version}" if info.distribution else info.module
        print(f"{info.name}  ({dist})")
        if info.error:
            print(f"    FAILED TO LOAD: {info.error}")
            continue
        if info.tier_types:
            print(f"    tier types: {', '.join(info.tier_types)}")
            _summaries({name: host.tier_types[name].summary for name in info.tier_types})
        if info.remote_schemes:
            print(f"    remote schemes: {', '.join(info.remote_schemes)}")
            _summaries({scheme: host.remote_schemes[scheme].summary for scheme in info.remote_schemes})
        if info.codecs:
            print(f"    codecs: {', '.join(info.codecs)}")
        if info.transports:
            print(f"    peer transports: {', '.join(info.transports)}")
        print(f"    hooks: {', '.join(info.hooks)}")
    return 0


def _summaries(summaries: dict[str, str]) -> None:
    for name, summary in summaries.items():
        if summary:
            print(f"      {name}: {summary}")


def _config_check(host: PluginHost, args: argparse.Namespace) -> int:
    config = load_config(args.file)
    planned = plan_tiers(config, host)
    model = config.model
    print(f"{args.file}: OK")
    print(
        f"  model {model.name}: {model.num_layers} layers, {model.num_kv_heads} kv heads x {model.head_size}, "
        f"{model.dtype}; chunk_size {config.chunk_size}; hash {config.hash_algorithm}"
    )
    for plan in planned:
        options = ", ".join(f"{key}={value}" for key, value in plan.options.model_dump().items())
        print(f"  tiers[{plan.index}] {plan.entry.tier_name} (type {plan.tier_type.name}): {options}")
    return 0


def build_parser(host: PluginHost) -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="lmplug", description="lmplug KV cache tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}

    plugins = commands.add_parser("plugins", help="list installed plugins, their versions and hooks")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    runners["plugins"] = lambda args: _plugins(host, args)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_commands.add_parser("check", help="validate a config file and the tiers it names")
    check.add_argument("file", help="YAML config file")
    runners["config"] = lambda args: _config_check(host, args)

    def register(command: CliCommand) -> None:
        if command.name in runners:
            raise LmplugError(f"two plugins add the lmplug sub-command {command.name!r}")
        command.configure(commands.add_parser(command.name, help=command.help))
        runners[command.name] = command.run

    host.pm.hook.lmplug_register_commands(register=register)
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    # The command is a process entry point, so it may set up logging (a library never does).
    logging.basicConfig(
        level=os.environ.get("LMPLUG_LOG_LEVEL", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        host = PluginHost.from_environment()
        parser, runners = build_parser(host)
        args = parser.parse_args(argv)
        return runners[args.command](args)
    except LmplugError as exc:
        print(f"lmplug: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
