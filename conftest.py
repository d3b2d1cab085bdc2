"""Repo-wide pytest set-up: asyncio and trio for every async test, env isolation, markers by rule.

The ``vllm``, ``real_server`` and ``slow`` markers (registered in pyproject.toml) are put
on tests here, by where they live and what fixtures they use, so that no test module has
to remember them. ``scripts/test.sh -m "not vllm and not real_server and not slow"`` runs
the fast rest.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parent

VLLM_TESTS = "tests/vllm/"
"""Everything below it imports vLLM or lmplug's vLLM integration: ``vllm``."""

SLOW_MODULES = frozenset(
    {
        "tests/test_benchmarks.py",
        "tests/test_demo.py",
        "tests/vllm/test_vllm_e2e.py",
        "tests/vllm/test_vllm_tp.py",
        "tests/vllm/test_vllm_real_model.py",
        "tests/vllm/test_vllm_serve.py",
        "tests/vllm/test_vllm_pd.py",
        "tests/vllm/test_vllm_blend.py",
        "plugins/lmplug-blend/tests/test_blend_quality_smollm2.py",
    }
)
"""The benchmarks' smoke run, the demo and the vLLM engine runs (a minute or more each): ``slow``."""

SERVER_FIXTURES = ("*redis*", "*s3_server*", "s3_url", "*seaweed*", "lm_*server*", "lm_url")
"""Fixtures (name patterns) that start or need a real redis-server, SeaweedFS or lmplug-server
(lmplug-remote's ``redis_servers.py`` and ``s3_servers.py``, ``lmplug_server.testing``). A test
gets ``real_server`` when it uses one, directly, through another fixture, or through a fixture
that asks for one by name (``request.getfixturevalue("redis_server")``)."""

SERVER_STARTERS = frozenset({"LmServerProcess", "RedisServer", "RedisClusterServers", "SeaweedS3", "running_seaweed"})
"""The helpers that start those servers: a test or fixture whose code calls one gets ``real_server``."""

SERVER_MODULES = "*_processes.py"
"""Test modules that start real processes of their own: ``real_server`` too."""


def markers_for(item: pytest.Item) -> set[str]:
    """The rule-based markers of ``item``."""
    path = item.path.relative_to(ROOT).as_posix() if item.path.is_relative_to(ROOT) else item.path.as_posix()
    markers = set()
    if path.startswith(VLLM_TESTS):
        markers.add("vllm")
    if path in SLOW_MODULES:
        markers.add("slow")
    fixtures, names = _fixtures_and_names(item)
    if (
        fnmatch.fnmatchcase(item.path.name, SERVER_MODULES)
        or any(fnmatch.fnmatchcase(name, pattern) for name in fixtures for pattern in SERVER_FIXTURES)
        or not SERVER_STARTERS.isdisjoint(names)
    ):
        markers.add("real_server")
    return markers


def _fixtures_and_names(item: pytest.Item) -> tuple[set[str], set[str]]:
    """The fixtures ``item`` uses, with those its fixtures ask for by name, and the global names
    that its test function and fixtures refer to."""
    fixtures = set(getattr(item, "fixturenames", ()))
    names: set[str] = set()
    test = getattr(getattr(item, "obj", None), "__code__", None)
    if test is not None:
        names.update(test.co_names)
    # pytest keeps the definitions of the fixture closure here (private, but stable since pytest 3);
    # without it, only fixtures requested by name are missed.
    info = getattr(item, "_fixtureinfo", None)
    for definitions in getattr(info, "name2fixturedefs", {}).values():
        for definition in definitions:
            code = getattr(definition.func, "__code__", None)
            if code is not None:
                names.update(code.co_names)
                fixtures.update(c for c in code.co_consts if isinstance(c, str) and c.isidentifier())
    return fixtures, names


@pytest.hookimpl(tryfirst=True)  # before -m deselects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted(markers_for(item)):
            item.add_marker(name)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's LMPLUG_* variables must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("LMPLUG_"):
            monkeypatch.delenv(name)
