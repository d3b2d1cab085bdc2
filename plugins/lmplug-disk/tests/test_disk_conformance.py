from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmplug.testing import TierConformance


class TestDiskTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self, tmp_path: Path) -> dict[str, Any]:
        return {"type": "disk", "path": str(tmp_path / "kv"), "capacity": "4MiB"}


class TestBufferedDiskTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self, tmp_path: Path) -> dict[str, Any]:
        return {"type": "disk", "path": str(tmp_path / "kv"), "capacity": "4MiB", "io_mode": "buffered"}
