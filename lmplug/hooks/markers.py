"""The pluggy markers of the ``lmplug`` project: the one place plugins take them from."""

from __future__ import annotations

import pluggy

PROJECT = "lmplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
