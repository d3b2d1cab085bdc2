"""The tier conformance suite over ``s3://``, against a real SeaweedFS S3 server."""

from __future__ import annotations

from typing import Any

import pytest

from lmplug.testing import TierConformance

from s3_servers import SeaweedS3


class TestS3RemoteTierConformance(TierConformance):
    @pytest.fixture
    def tier_entry(self, s3_server: SeaweedS3, s3_url: str) -> dict[str, Any]:
        return {"type": "remote", "url": s3_url, "connector": s3_server.options()}
