"""lmplug-server: lmplug's own shared KV store, the server behind ``lm://`` URLs.

A standalone process (``lmplug-server``, or ``lmplug server`` where lmplug-remote is
installed) that keeps values in memory with LRU eviction, optionally spilling to disk. It
depends on anyio and prometheus-client only: importing it never loads lmplug or torch.
The wire protocol is ``PROTOCOL.md``; :mod:`lmplug_server.protocol` and
:mod:`lmplug_server.sockio` are shared with the ``lm://`` client in lmplug-remote.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PORT", "TOKEN_ENV"]

DEFAULT_PORT = 9400
"""The TCP port of ``lmplug-server`` and of an ``lm://host`` URL without one."""

TOKEN_ENV = "LMPLUG_SERVER_TOKEN"
"""The environment variable holding the shared auth token (read by the server and by ``lm://`` clients)."""
