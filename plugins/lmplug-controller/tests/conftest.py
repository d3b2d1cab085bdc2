"""Fixtures of lmplug-controller's tests (see lmplug_controller.testing).

Imported, not named in ``pytest_plugins``: every plugin's tests share the repository's
rootdir, where pytest refuses ``pytest_plugins`` in a conftest below the top level.
"""

from __future__ import annotations

from lmplug_controller.testing import controller_processes

__all__ = ["controller_processes"]
