"""Fixtures of lmplug-remote's tests: real servers on loopback, started per session."""

from __future__ import annotations

from lm_servers import *  # noqa: F403
from redis_servers import *  # noqa: F403
from s3_servers import *  # noqa: F403
