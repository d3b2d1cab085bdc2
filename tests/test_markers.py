"""The vllm, real_server and slow markers land where the root conftest.py's rules put them, and -m selects by them.

One collection of the whole repository in a subprocess, with ``-m`` on, records every test's
markers and whether ``-m`` kept it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

ROOT = Path(__file__).parents[1]
RULE_MARKERS = ("vllm", "real_server", "slow")

RECORDER = """
import json, os

rows = {}

def markers(item):
    return sorted({mark.name for mark in item.iter_markers()})

def pytest_deselected(items):
    for item in items:
        rows[item.nodeid] = {"selected": False, "markers": markers(item)}

def pytest_collection_finish(session):
    for item in session.items:
        rows[item.nodeid] = {"selected": True, "markers": markers(item)}
    with open(os.environ["MARKER_RECORD"], "w") as out:
        json.dump(rows, out)
"""


class Collected(NamedTuple):
    selected: bool
    markers: frozenset[str]


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Collected]:
    """Every test of the repository (node id) and what ``pytest --collect-only -m "vllm or real_server or slow"``
    made of it."""
    folder = tmp_path_factory.mktemp("recorder")
    (folder / "marker_recorder.py").write_text(RECORDER)
    record = folder / "record.json"
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "MARKER_RECORD": str(record)}
    command = ["--collect-only", "-q", "-p", "marker_recorder", "-m", " or ".join(RULE_MARKERS)]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(record.read_text())
    return {node: Collected(row["selected"], frozenset(row["markers"])) for node, row in rows.items()}


def marked(collected: dict[str, Collected], marker: str) -> set[str]:
    return {node for node, row in collected.items() if marker in row.markers}


def modules(nodes: set[str]) -> set[str]:
    return {node.split("::", 1)[0] for node in nodes}


def test_minus_m_selects_exactly_the_tests_the_rules_marked(collected: dict[str, Collected]) -> None:
    selected = {node for node, row in collected.items() if row.selected}
    assert selected == set().union(*(marked(collected, marker) for marker in RULE_MARKERS))
    assert len(selected) < len(collected)  # the fast rest is left


def test_vllm_marks_exactly_the_tests_in_tests_vllm(collected: dict[str, Collected]) -> None:
    in_tests_vllm = {node for node in collected if node.startswith("tests/vllm/")}
    assert in_tests_vllm
    assert marked(collected, "vllm") == in_tests_vllm


def _root_conftest() -> ModuleType:
    """The repository's root conftest.py, loaded by path (every tests folder has a ``conftest``)."""
    spec = importlib.util.spec_from_file_location("lmplug_root_conftest", ROOT / "conftest.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slow_marks_the_benchmarks_and_the_vllm_engine_runs(collected: dict[str, Collected]) -> None:
    slow = modules(marked(collected, "slow"))
    assert "tests/test_benchmarks.py" in slow
    assert slow == set(_root_conftest().SLOW_MODULES)  # each listed module exists and is marked
    assert all("slow" in row.markers for node, row in collected.items() if node.split("::")[0] in slow)


def test_real_server_marks_the_tests_that_start_servers(collected: dict[str, Collected]) -> None:
    servers = modules(marked(collected, "real_server"))
    for kind in ("test_remote_redis*", "test_remote_s3*", "test_remote_lm*", "test_server_*"):
        assert fnmatch.filter([Path(module).name for module in servers], kind), f"no {kind} test is real_server"
    processes = {node for node in collected if fnmatch.fnmatchcase(node.split("::")[0], "*_processes.py")}
    assert processes
    assert processes <= marked(collected, "real_server")
    cpu = {node for node in collected if node.startswith("plugins/lmplug-cpu/")}
    assert cpu
    assert not cpu & marked(collected, "real_server")  # a tier without a server runs in the fast subset
