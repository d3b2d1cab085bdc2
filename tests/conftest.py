"""Fixtures for core tests: third-party plugins installed through real entry points."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def _install(site: Path, distribution: str, module: str, entry_point: str, source: str) -> None:
    """Lay out a module and its ``.dist-info`` on a sys.path folder, as pip would."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[lmplug]\n{entry_point} = {module}\n")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder holding the memo plugin and a broken one (an import that fails)."""
    site = tmp_path_factory.mktemp("site")
    _install(site, "lmplug-memo", "lmplug_memo", "memo", (FIXTURES / "lmplug_memo.py").read_text())
    _install(
        site,
        "lmplug-broken",
        "lmplug_broken",
        "broken",
        'raise ImportError("libbroken.so.1: cannot open shared object file")\n',
    )
    return site


@pytest.fixture
def third_party_plugins(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fixture plugins on sys.path for this test, so entry-point discovery finds them."""
    monkeypatch.syspath_prepend(str(plugin_site))
    return plugin_site


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "lmplug.yaml"
    shutil.copy(Path(__file__).parents[1] / "configs" / "default.yaml", path)
    return path
