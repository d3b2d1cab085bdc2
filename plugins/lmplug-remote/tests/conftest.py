"""Fixtures of lmplug-remote's tests: real servers on loopback, started per session.

Imported, not named in ``pytest_plugins``: every plugin's tests share the repository's
rootdir, where pytest refuses ``pytest_plugins`` in a conftest below the top level.
"""

from __future__ import annotations

from lmplug_server.testing import lm_auth_server, lm_server, lm_servers, lm_url

from redis_servers import redis_cluster, redis_server, redis_servers, stalling_proxy
from s3_servers import s3_server, s3_url

__all__ = [
    "lm_auth_server",
    "lm_server",
    "lm_servers",
    "lm_url",
    "redis_cluster",
    "redis_server",
    "redis_servers",
    "s3_server",
    "s3_url",
    "stalling_proxy",
]
