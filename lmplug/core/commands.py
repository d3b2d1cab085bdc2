"""Sub-commands that plugins add to the ``lmplug`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CliCommand:
    """A sub-command a plugin adds through ``lmplug_register_commands``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
