"""Fixtures of lmplug-remote's tests: real servers on loopback, started per session."""

from __future__ import annotations
