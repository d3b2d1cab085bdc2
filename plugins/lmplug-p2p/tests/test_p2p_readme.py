"""The README's configuration table mirrors the config model."""

from __future__ import annotations

from pathlib import Path

from lmplug.testing import assert_readme_documents
from lmplug_p2p import P2PTierConfig

README = Path(__file__).parents[1] / "README.md"


def test_readme_documents_every_option() -> None:
    assert_readme_documents(README, P2PTierConfig, section="Configuration")
