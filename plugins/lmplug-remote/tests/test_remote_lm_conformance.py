"""The tier conformance suite for ``type: remote`` over ``lm://``, against a real lmplug-server."""

from __future__ import annotations

from typing import Any

import pytest

from lmplug.testing import TierConformance, make_config


class TestLmRemoteTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self, lm_url: str) -> dict[str, Any]:
        return {"type": "remote", "url": lm_url, "connector": {"connections": 4}}

    @pytest.fixture
    def conformance_config(self, tier_entry: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
        # One server serves the whole session; a namespace per test keeps each test's keys its own,
        # as a fresh, empty store would.
        config = make_config([tier_entry], chunk_size=self.chunk_size, save_partial_chunks=True)
        config["namespace"] = request.node.nodeid
        return config
