"""The README has every plugin's headings, and each options table mirrors its model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from lmplug.testing import PLUGIN_README_HEADINGS, assert_readme_documents, readme_headings
from lmplug_remote.lm import LmOptions
from lmplug_remote.redis import RedisOptions, RedisTLSOptions
from lmplug_remote.s3 import S3Options
from lmplug_remote.tier import BreakerConfig, RemoteTierConfig

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_has_the_plugin_headings_in_order() -> None:
    assert readme_headings(README.read_text()) == list(PLUGIN_README_HEADINGS)


@pytest.mark.parametrize(
    ("model", "section"),
    [
        (RemoteTierConfig, "Configuration"),
        (BreakerConfig, "Circuit breaker (`breaker:`)"),
        (S3Options, "S3 connector (`s3://`)"),
        (RedisOptions, "Redis connectors (`redis://`, `rediss://`, `redis+cluster://`)"),
        (RedisTLSOptions, "TLS (`tls:`)"),
        (LmOptions, "lmplug-server connector (`lm://`)"),
    ],
)
def test_each_options_table_lists_its_models_fields(model: type[BaseModel], section: str) -> None:
    assert_readme_documents(README, model, section=section)
