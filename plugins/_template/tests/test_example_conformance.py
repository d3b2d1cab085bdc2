"""The tier conformance suite, run against the example tier (every test, on asyncio and trio)."""

from __future__ import annotations

from typing import Any

import pytest

from lmplug.testing import TierConformance


class TestExampleTier(TierConformance):
    @pytest.fixture
    def tier_entry(self) -> dict[str, Any]:
        return {"type": "example", "max_chunks": 64}
