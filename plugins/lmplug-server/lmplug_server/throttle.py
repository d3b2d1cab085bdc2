"""A log that a misbehaving peer cannot flood: one line per kind of trouble per interval.

(lmplug has its own, but this package must not import lmplug.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """Logs each ``kind`` at ``level`` at most once per ``every`` seconds, at DEBUG otherwise.

    The next line of a kind that goes out says how many were held back since the last one,
    so the operator still learns how often it happens.
    """

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 10.0,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self.level = level
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args``; True when it went out at ``level``."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._held[kind] = self._held.get(kind, 0) + 1
            self.logger.debug(message, *args)
            return False
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held and last is not None:
            self.logger.log(self.level, message + " (and %d more like it in %.0f s)", *args, held, now - last)
        else:
            self.logger.log(self.level, message, *args)
        return True
