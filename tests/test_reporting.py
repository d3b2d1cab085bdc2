"""ThrottledLog: each kind of failure at WARNING once per period, DEBUG in between."""

from __future__ import annotations

import logging

import pytest

from lmplug.core.reporting import ThrottledLog


def test_each_kind_warns_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    log = ThrottledLog(logging.getLogger("lmplug.test"), every=60, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, "lmplug.test"):
        assert log.report("read", "cannot read %s", "a")
        assert not log.report("read", "cannot read %s", "b")
        assert log.report("write", "cannot write %s", "c")  # another kind is not held back
        now[0] += 60
        assert log.report("read", "cannot read %s", "d")
    levels = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert levels == [
        ("WARNING", "cannot read a"),
        ("DEBUG", "cannot read b"),
        ("WARNING", "cannot write c"),
        ("WARNING", "cannot read d"),
    ]
