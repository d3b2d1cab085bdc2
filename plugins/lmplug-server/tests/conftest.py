"""Fixtures of lmplug-server's tests: real server processes on loopback (see lmplug_server.testing).

Imported, not named in ``pytest_plugins``: every plugin's tests share the repository's
rootdir, where pytest refuses ``pytest_plugins`` in a conftest below the top level.
"""

from __future__ import annotations

from lmplug_server.testing import lm_auth_server, lm_server, lm_servers, lm_url

__all__ = ["lm_auth_server", "lm_server", "lm_servers", "lm_url"]
