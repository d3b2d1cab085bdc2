"""The README's configuration table mirrors the config model."""

from __future__ import annotations

import re
from pathlib import Path

from lmplug_disk import DiskTierConfig


def test_readme_documents_every_option() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", readme, re.MULTILINE))
    assert documented == set(DiskTierConfig.model_fields)
