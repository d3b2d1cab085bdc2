"""``redis://``, ``rediss://`` (TLS) and ``redis+cluster://``: Redis and Redis Cluster through redis-py.

The scheme registers with its options model only; the connector, and redis-py with it, is
imported when a tier with one of these URLs is built (``pip install 'lmplug-remote[redis]'``).
"""

from __future__ import annotations

from lmplug.tierkit import RemoteConnector, RemoteScheme
from lmplug_remote.extras import library_missing
from lmplug_remote.redis.options import RedisOptions, RedisTLSOptions

__all__ = ["SCHEME", "RedisOptions", "RedisTLSOptions"]


def _connector(url: str, options: RedisOptions) -> RemoteConnector:
    try:
        from lmplug_remote.redis.connector import RedisConnector
    except ModuleNotFoundError as exc:
        raise library_missing(exc, "redis:// URLs", "redis") from exc
    return RedisConnector(url, options)


SCHEME = RemoteScheme(
    ("redis", "rediss", "redis+cluster"),
    RedisOptions,
    _connector,
    "Redis (rediss:// with TLS) and Redis Cluster (redis+cluster://host:port,host:port) via redis-py",
)
