"""Checks that keep a plugin's README true: its headings and its option tables.

Every plugin README has the same ``##`` headings, in this order
(:data:`PLUGIN_README_HEADINGS`), and each options table (rows that start with a
backquoted key) lists exactly the fields of the config model it documents::

    from lmplug.testing import assert_readme_documents

    def test_readme_documents_every_option():
        assert_readme_documents(README, MyTierConfig, section="Configuration")
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

PLUGIN_README_HEADINGS = ("What it is", "Install", "Configuration", "Capabilities", "Hardware", "Metrics")
"""The ``##`` headings of every plugin README, in order."""

_HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.MULTILINE)
_ROW_KEY = re.compile(r"^\| `(\w+)` \|", re.MULTILINE)


def readme_headings(text: str, level: int = 2) -> list[str]:
    """The headings of ``level`` (2 for ``##``) in ``text``, in order (fenced code skipped)."""
    return [title for hashes, title in _HEADING.findall(_without_code(text)) if len(hashes) == level]


def readme_section(text: str, title: str) -> str:
    """The body of the first heading named ``title`` (any level), up to the next heading of
    the same or a higher level; a clear ``AssertionError`` when there is none."""
    text = _without_code(text)
    headings = list(_HEADING.finditer(text))
    for index, heading in enumerate(headings):
        if heading.group(2) == title:
            level = len(heading.group(1))
            end = next((h.start() for h in headings[index + 1 :] if len(h.group(1)) <= level), len(text))
            return text[heading.end() : end]
    raise AssertionError(f"the README has no heading {title!r}")


def table_keys(text: str) -> list[str]:
    """The keys of the first options table in ``text`` (rows ``| `key` | ...``), in order."""
    keys: list[str] = []
    for line in text.splitlines():
        match = _ROW_KEY.match(line)
        if match:
            keys.append(match.group(1))
        elif keys and not line.startswith("|"):
            break
    return keys


def assert_readme_documents(readme: str | Path, model: type[BaseModel], *, section: str) -> None:
    """The first options table under heading ``section`` lists exactly the fields of ``model``."""
    text = Path(readme).read_text(encoding="utf-8") if isinstance(readme, Path) else readme
    documented = table_keys(readme_section(text, section))
    fields = list(model.model_fields)
    missing = [name for name in fields if name not in documented]
    unknown = [name for name in documented if name not in fields]
    assert not missing, f"README section {section!r} does not document {model.__qualname__} options {missing}"
    assert not unknown, f"README section {section!r} documents {unknown}, which {model.__qualname__} does not have"
    assert len(documented) == len(set(documented)), f"README section {section!r} lists a key twice: {documented}"


def _without_code(text: str) -> str:
    """``text`` with fenced code blocks blanked out (a ``#`` comment in YAML is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
