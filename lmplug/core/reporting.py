"""Reporting failures without flooding the log: the first of a kind at WARNING, then once a minute."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable


class ThrottledLog:
    """Logs a failure of each kind at WARNING at most once per ``every`` seconds, DEBUG otherwise.

    Tiers use it for failures they degrade from (a miss, a skipped write): the operator
    hears of each kind of trouble promptly, and a failing store does not fill the disk.
    """

    def __init__(
        self, logger: logging.Logger, every: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.every = every
        self._clock = clock
        self._last: dict[Hashable, float] = {}

    def report(self, kind: Hashable, message: str, *args: object) -> bool:
        """Log ``message % args``; True when it went out at WARNING."""
        now = self._clock()
        if now - self._last.get(kind, -self.every) >= self.every:
            self._last[kind] = now
            self.logger.warning(message, *args)
            return True
        self.logger.debug(message, *args)
        return False
