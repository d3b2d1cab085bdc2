"""The README keeps to the plugin shape and documents every option and counter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmplug.testing import PLUGIN_README_HEADINGS, assert_readme_documents, readme_headings
from lmplug.testing.readme import readme_section
from lmplug_blend.config import BlendConfig, PolicyConfig, SelectionConfig
from lmplug_blend.extension import BlendCounters

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_has_the_plugin_headings() -> None:
    assert tuple(readme_headings(README.read_text())) == PLUGIN_README_HEADINGS


def test_every_option_is_documented() -> None:
    assert_readme_documents(README, BlendConfig, section="Configuration")
    text = readme_section(README.read_text(), "Configuration")
    for model, title in ((SelectionConfig, "`selection`:"), (PolicyConfig, "`policy`:")):
        table = text[text.index(title) :]
        for name in model.model_fields:
            assert f"| `{name}` |" in table, f"{title} {name} is not documented"


def test_every_counter_is_documented() -> None:
    metrics = readme_section(README.read_text(), "Metrics")
    for field in dataclasses.fields(BlendCounters):
        assert f"`{field.name}`" in metrics, f"counter {field.name} is not documented"
