"""The tier conformance suite over ``redis://`` and ``redis+cluster://``, against real servers."""

from __future__ import annotations

from typing import Any

import pytest

from lmplug.testing import TierConformance

from redis_servers import RedisClusterServers, RedisServer


class TestRedisTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self, redis_server: RedisServer) -> dict[str, Any]:
        redis_server.flush()  # the asyncio and trio runs of a test store the same chunks
        return {"type": "remote", "url": redis_server.url}


class TestRedisClusterTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self, redis_cluster: RedisClusterServers) -> dict[str, Any]:
        redis_cluster.flush()
        return {"type": "remote", "url": redis_cluster.url}
