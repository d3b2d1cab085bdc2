"""A circuit breaker: after repeated failures a remote store is not asked again until a cool-down passes.

While the breaker is open every call is refused at once, so a dead store costs the engine
a miss, not a time-out per request. After the cool-down one probe call goes through
(half-open); its success closes the breaker, its failure opens it again with the
cool-down doubled (up to a maximum): that is the reconnect back-off.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures; all state changes happen on the caller's event-loop thread."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        max_cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max(cooldown, max_cooldown)
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.cooldown = cooldown
        self.failures = 0
        self.opened = 0
        """How many times the breaker has opened."""
        self._retry_at = 0.0
        self._probing = False

    @property
    def retry_in(self) -> float:
        """Seconds until the next probe is allowed (0 when closed)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self._retry_at - self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the store now. In half-open state only one probe is in flight."""
        if self.state is BreakerState.CLOSED:
            return True
        if self._probing:
            return False
        if self._clock() < self._retry_at:
            return False
        self.state = BreakerState.HALF_OPEN
        self._probing = True
        return True

    def succeeded(self) -> bool:
        """Record a successful call; True when it closed an open breaker (the store is back)."""
        recovered = self.state is not BreakerState.CLOSED
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.cooldown = self.base_cooldown
        self._probing = False
        return recovered

    def failed(self) -> bool:
        """Record a failed call; True when this failure opened the breaker."""
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        elif self.state is BreakerState.OPEN or self.failures < self.threshold:
            return False
        self.state = BreakerState.OPEN
        self.opened += 1
        self._probing = False
        self._retry_at = self._clock() + self.cooldown
        return True

    def abandoned(self) -> None:
        """A call ended with neither answer (cancelled): a half-open probe may be tried again."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN
            self._probing = False
