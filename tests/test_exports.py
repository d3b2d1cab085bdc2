"""The two public modules: lmplug (applications) and lmplug.tierkit (plugin authors).

Every exported name exists and says what it is; the two audiences do not share names; the
kit's docstring, where plugin authors start reading, mentions everything it exports.
"""

from __future__ import annotations

import inspect
import re
from types import ModuleType

import pytest

import lmplug
from lmplug import tierkit


@pytest.mark.parametrize("module", [lmplug, tierkit], ids=lambda module: module.__name__)
def test_every_exported_name_exists_and_is_documented(module: ModuleType) -> None:
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{module.__name__}.{name} has no docstring"


def test_applications_and_plugins_see_different_names() -> None:
    assert not set(lmplug.__all__) & set(tierkit.__all__)


def test_the_kit_docstring_names_everything_it_exports() -> None:
    mentioned = set(re.findall(r":(?:class|func|data):`(\w+)`", tierkit.__doc__ or ""))
    assert set(tierkit.__all__) - {"Batch"} <= mentioned  # Batch is WriteBehind's argument type


def test_the_application_api_is_what_the_readme_shows() -> None:
    for name in ("open_cache", "SyncCache", "load_config", "PluginHost", "empty_kv"):
        assert name in lmplug.__all__
    assert not hasattr(lmplug, "Tier")  # a plugin-author name: lmplug.tierkit.Tier
