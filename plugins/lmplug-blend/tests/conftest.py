"""Fixtures: the tiny Llama and a cache shaped for its KV."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lmplug import SyncCache
from lmplug.testing import make_config

from blend_testing import HEAD_SIZE, KV_HEADS, LAYERS, tiny_llama


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama()


@pytest.fixture
def cache() -> Iterator[SyncCache]:
    config = make_config(
        [{"type": "cpu", "capacity": "64MiB"}],
        chunk_size=16,
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_size=HEAD_SIZE,
        dtype="float32",
    )
    with SyncCache(config, environ={}) as opened:
        yield opened
