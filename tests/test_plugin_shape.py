"""Every plugin in plugins/ has the same shape, and the template it is copied from works.

The shape (``plugins/_template`` is the reference, ``docs/hooks.md`` explains it):

- ``pyproject.toml`` names the package under the ``lmplug`` entry-point group and ships ``py.typed``;
- the package's ``__init__.py`` holds the hookimpls only (imports, ``__all__``, ``@hookimpl`` functions);
- the tier is in ``tier.py``; the package imports from lmplug only ``lmplug`` and ``lmplug.tierkit``;
- ``tests/`` runs the conformance suite (``test_*conformance.py``) and checks the README's tables;
- the README has the headings of :data:`lmplug.testing.PLUGIN_README_HEADINGS`, in order.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from lmplug.testing import PLUGIN_README_HEADINGS, readme_headings

PLUGINS = Path(__file__).parents[1] / "plugins"
TEMPLATE = PLUGINS / "_template"
PUBLIC = {"lmplug", "lmplug.tierkit"}


def _project(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((directory / "pyproject.toml").read_text())
    return data


def _tier_plugins() -> list[Path]:
    found = [
        directory
        for directory in sorted(PLUGINS.iterdir())
        if (directory / "pyproject.toml").is_file()
        and "lmplug" in _project(directory)["project"].get("entry-points", {})
        # a service that only registers a command (lmplug-controller) names a module, not its package
        and "." not in "".join(_project(directory)["project"]["entry-points"]["lmplug"].values())
    ]
    assert TEMPLATE in found
    assert len(found) >= 4
    return found


def _package(directory: Path) -> Path:
    (module,) = _project(directory)["project"]["entry-points"]["lmplug"].values()
    return directory / module


@pytest.fixture(params=_tier_plugins(), ids=lambda directory: directory.name)
def plugin(request: pytest.FixtureRequest) -> Path:
    directory: Path = request.param
    return directory


def test_the_readme_has_the_plugin_headings(plugin: Path) -> None:
    assert tuple(readme_headings((plugin / "README.md").read_text())) == PLUGIN_README_HEADINGS


def test_the_package_is_registered_and_typed(plugin: Path) -> None:
    project = _project(plugin)
    package = _package(plugin)
    assert project["project"]["name"] == plugin.name.replace("_template", "lmplug-example")
    assert any(requirement.startswith("lmplug>") for requirement in project["project"]["dependencies"])
    assert (package / "py.typed").is_file()
    assert project["tool"]["setuptools"]["package-data"][package.name] == ["py.typed"]
    assert (package / "tier.py").is_file()


def test_init_holds_the_hookimpls_only(plugin: Path) -> None:
    tree = ast.parse((_package(plugin) / "__init__.py").read_text())
    hookimpls = 0
    for index, node in enumerate(tree.body):
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Assign) and [ast.unparse(target) for target in node.targets] == ["__all__"]:
            continue
        if isinstance(node, ast.FunctionDef) and node.name.startswith("lmplug_"):
            assert [ast.unparse(d) for d in node.decorator_list] == ["hookimpl"], node.name
            hookimpls += 1
            continue
        pytest.fail(f"{plugin.name}: __init__.py line {node.lineno} is not an import or a hookimpl")
    assert hookimpls >= 1


def _lmplug_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {module for module in modules if module == "lmplug" or module.startswith("lmplug.")}


def test_the_package_uses_public_modules_only(plugin: Path) -> None:
    for path in sorted(_package(plugin).rglob("*.py")):
        private = _lmplug_imports(path) - PUBLIC
        assert not private, f"{path.relative_to(PLUGINS)} imports {sorted(private)}; use lmplug.tierkit"
    for path in sorted((plugin / "tests").rglob("*.py")):
        private = _lmplug_imports(path) - PUBLIC - {"lmplug.testing"}
        assert not private, f"{path.relative_to(PLUGINS)} imports {sorted(private)}"


def test_the_tests_run_conformance_and_check_the_readme(plugin: Path) -> None:
    tests = {path.name for path in (plugin / "tests").glob("test_*.py")}
    assert any(name.endswith("conformance.py") for name in tests), tests
    assert any(name.endswith("readme.py") for name in tests), tests


def test_the_template_installs_and_passes_its_tests(tmp_path: Path) -> None:
    """Installed as pip would lay it out (the package and its entry point on a path), the
    template's own tests pass: conformance on asyncio and trio, and its README check."""
    site = tmp_path / "site"
    shutil.copytree(TEMPLATE / "lmplug_example", site / "lmplug_example")
    info = site / "lmplug_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmplug-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lmplug]\nexample = lmplug_example\n")
    copy = tmp_path / "template"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("lmplug_example", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(copy), str(copy / "tests")],
        cwd=copy,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
    assert "failed" not in done.stdout
