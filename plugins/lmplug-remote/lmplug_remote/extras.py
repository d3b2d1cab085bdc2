"""Optional libraries: each connector and codec names the extra that brings what it needs."""

from __future__ import annotations

from lmplug import PluginUnavailable

__all__ = ["library_missing"]


def library_missing(exc: ModuleNotFoundError, needed_by: str, extra: str) -> Exception:
    """The error to raise when importing a connector or codec failed for want of ``exc.name``:
    :class:`lmplug.PluginUnavailable` naming the extra to install, or ``exc`` itself when the
    missing module is part of lmplug (a broken install, not an absent option)."""
    package = (exc.name or "").split(".")[0]
    if not package or package in ("lmplug", "lmplug_remote"):
        return exc
    return PluginUnavailable(
        f"{needed_by} need the {package!r} package, which is not installed; pip install 'lmplug-remote[{extra}]'"
    )
