"""Registers ``lmplug pd-proxy`` with lmplug's command line (the entry point ``lmplug: pd-proxy``).

The only module of the package that imports lmplug (:mod:`lmplug.tierkit`); only the ``lmplug``
command loads it. The proxy itself, and ``lmplug-pd-proxy``, import neither lmplug nor torch.
"""

from __future__ import annotations

from collections.abc import Callable

from lmplug.tierkit import CliCommand, hookimpl
from lmplug_pd import cli


@hookimpl
def lmplug_register_commands(register: Callable[[CliCommand], None]) -> None:
    register(
        CliCommand(
            "pd-proxy",
            "run the PD proxy: each OpenAI request to a prefill instance, then a decode instance",
            cli.add_arguments,
            cli.run_from_arguments,
        )
    )
