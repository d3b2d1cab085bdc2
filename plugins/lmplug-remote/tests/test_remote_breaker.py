"""The circuit breaker's states, on a clock the test moves."""

from __future__ import annotations

from lmplug_remote.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(3, 1.0, 8.0, Clock())
    assert not breaker.failed()
    assert not breaker.failed()
    assert not breaker.succeeded()  # a success in between resets the count
    assert not breaker.failed()
    assert not breaker.failed()
    assert breaker.failed()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_one_probe_after_the_cooldown_and_backoff_doubles() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, 3.0, clock)
    breaker.failed()
    clock.now += 0.99
    assert not breaker.allow()
    clock.now += 0.02
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe in flight
    assert breaker.failed()
    assert breaker.cooldown == 2.0
    clock.now += 2.01
    assert breaker.allow()
    breaker.failed()
    assert breaker.cooldown == 3.0  # capped
    clock.now += 3.01
    assert breaker.allow()
    assert breaker.succeeded()  # recovered
    assert breaker.state is BreakerState.CLOSED
    assert breaker.cooldown == 1.0
    assert breaker.opened == 3


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, 3.0, clock)
    breaker.failed()
    clock.now += 1.5
    assert breaker.allow()
    breaker.abandoned()
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow()
