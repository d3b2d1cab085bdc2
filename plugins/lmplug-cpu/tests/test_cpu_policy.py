from __future__ import annotations

import pytest

from lmplug.tierkit import ChunkKey
from lmplug_cpu.policy import make_policy

A, B, C = (ChunkKey(bytes([i]) * 24) for i in range(3))


def order(name: str, accesses: list[ChunkKey]) -> list[ChunkKey]:
    policy = make_policy(name)  # type: ignore[arg-type]
    for key in (A, B, C):
        policy.inserted(key)
    for key in accesses:
        policy.accessed(key)
    return list(policy.order())


def test_lru_evicts_the_least_recently_used() -> None:
    assert order("lru", [A]) == [B, C, A]


def test_fifo_ignores_hits() -> None:
    assert order("fifo", [A, A]) == [A, B, C]


def test_lfu_evicts_the_least_frequently_used_then_oldest() -> None:
    assert order("lfu", [C, C, A]) == [B, A, C]


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo"])
def test_removed_keys_leave_the_order(name: str) -> None:
    policy = make_policy(name)  # type: ignore[arg-type]
    policy.inserted(A)
    policy.inserted(B)
    policy.accessed(A)
    policy.removed(A)
    policy.removed(C)  # unknown: ignored
    assert list(policy.order()) == [B]
