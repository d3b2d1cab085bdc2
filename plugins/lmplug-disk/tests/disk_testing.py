"""Helpers shared by the disk tier's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmplug
from lmplug.testing import make_config, reference_kv

CHUNK = 16
CHUNK_FILE = 4096 + 4096  # header block + 2 KiB payload padded to a block


def disk_config(path: Path, *, cpu: bool = False, **options: Any) -> dict[str, Any]:
    tiers: list[dict[str, Any]] = [{"type": "cpu", "capacity": "1MiB"}] if cpu else []
    tiers.append({"type": "disk", "path": str(path), **options})
    return make_config(tiers, chunk_size=CHUNK)


def prompt(seed: int, chunks: int) -> list[int]:
    return [(seed * 7717 + i * 13) % 30_000 for i in range(chunks * CHUNK)]


def chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob("lmplug-*/??/*.kv"))


async def store_on_disk_only(cache: lmplug.Cache, tokens: list[int], config: dict[str, Any]) -> None:
    """Store ``tokens``, wait for the disk writes, and drop them from L1 so reads come from disk."""
    await cache.store(tokens, reference_kv(tokens, config))
    await cache.pipeline.slots[-1].tier.drain()
    await cache.evict(tokens, tiers=["cpu"])
