"""The README's tier table mirrors the config models."""

from __future__ import annotations

import re
from pathlib import Path

from lmplug_remote.tier import BreakerConfig, RemoteTierConfig


def test_readme_documents_every_tier_option() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The remote tier", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    assert documented == set(RemoteTierConfig.model_fields) | set(BreakerConfig.model_fields)
