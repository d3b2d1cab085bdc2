"""Repo-wide pytest set-up: every async test runs under asyncio and trio; env isolation."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's LMPLUG_* variables must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("LMPLUG_"):
            monkeypatch.delenv(name)
