"""Test helpers for lmplug and its plugins, and the tier conformance suite.

A tier plugin runs the conformance suite against itself by subclassing
:class:`TierConformance` in its tests and giving the tier's config entry::

    from lmplug.testing import TierConformance

    class TestMyTier(TierConformance):
        @pytest.fixture
        def tier_entry(self, tmp_path):
            return {"type": "mytier", "path": str(tmp_path)}
"""

from __future__ import annotations

from lmplug.testing.conformance import TierConformance
from lmplug.testing.kv import make_config, reference_kv
from lmplug.testing.net import free_port
from lmplug.testing.readme import PLUGIN_README_HEADINGS, assert_readme_documents, readme_headings

__all__ = [
    "PLUGIN_README_HEADINGS",
    "TierConformance",
    "assert_readme_documents",
    "free_port",
    "make_config",
    "readme_headings",
    "reference_kv",
]
