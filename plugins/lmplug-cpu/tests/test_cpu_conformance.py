from __future__ import annotations

from typing import Any

import pytest

from lmplug.testing import TierConformance


class TestCpuTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self) -> dict[str, Any]:
        return {"type": "cpu", "capacity": "1MiB"}


class TestCpuTierLfuConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self) -> dict[str, Any]:
        return {"type": "cpu", "capacity": "1MiB", "eviction": "lfu"}
