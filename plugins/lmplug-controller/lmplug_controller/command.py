"""Registers ``lmplug controller`` with lmplug's command line (the entry point ``lmplug: controller``).

The only module of the package that imports lmplug (:mod:`lmplug.tierkit`). Only the
``lmplug`` command loads it, and that command has lmplug loaded already; the controller's own
modules, and ``lmplug-controller``, never import lmplug or torch.
"""

from __future__ import annotations

from collections.abc import Callable

from lmplug.tierkit import CliCommand, hookimpl
from lmplug_controller import cli


@hookimpl
def lmplug_register_commands(register: Callable[[CliCommand], None]) -> None:
    register(
        CliCommand(
            "controller",
            "run lmplug-controller: which instance holds which KV chunks, an HTTP API and a dashboard",
            cli.add_arguments,
            cli.run_from_arguments,
        )
    )
