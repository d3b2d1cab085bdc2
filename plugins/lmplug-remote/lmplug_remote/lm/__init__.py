"""``lm://host[:port]``: lmplug-server, lmplug's own shared store (protocol: lmplug-server's PROTOCOL.md).

The scheme registers with its options model only; the connector, and lmplug-server's protocol
modules with it, is imported when a tier with an ``lm://`` URL is built
(``pip install 'lmplug-remote[lm]'``).
"""

from __future__ import annotations

from lmplug.tierkit import RemoteConnector, RemoteScheme
from lmplug_remote.extras import library_missing
from lmplug_remote.lm.options import LmOptions

__all__ = ["SCHEME", "LmOptions"]


def _connector(url: str, options: LmOptions) -> RemoteConnector:
    try:
        from lmplug_remote.lm.connector import LmConnector
    except ModuleNotFoundError as exc:
        raise library_missing(exc, "lm:// URLs", "lm") from exc
    return LmConnector(url, options)


SCHEME = RemoteScheme(("lm",), LmOptions, _connector, "lmplug-server (lmplug's own store), pooled TCP, zero-copy")
