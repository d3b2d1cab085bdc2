"""A prefill instance in its own process: stores a prompt, then pushes it, slowly, to a receiver.

Usage: ``python pd_sender_peer.py CONFIG.json SEED LENGTH DESTINATION``; prints ``pushing`` when it
starts the push and the pushed token count when it ends (the test kills it before).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
from pd_transfer_testing import prompt

import lmplug
from lmplug.testing import reference_kv


async def main(config_path: str, seed: int, length: int, destination: str) -> None:
    config = json.loads(Path(config_path).read_text())
    tokens = prompt(seed, length)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        print("pushing", flush=True)
        print(await cache.push(tokens, destination=destination, transfer_id="killed", timeout=60), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
