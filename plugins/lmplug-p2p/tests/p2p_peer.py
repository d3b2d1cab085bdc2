"""A peer instance in its own process, for the multi-process tests: a ``SyncCache`` with ``cpu`` +
``p2p`` tiers that stores and evicts prompts on command.

    python p2p_peer.py CONFIG.json BACKEND

Reads one command per line from stdin (``store SEED CHUNKS``, ``evict SEED CHUNKS``, or
``store-tokens`` / ``evict-tokens`` followed by a JSON list of token ids), answers ``ok`` on
stdout after each, ``ready`` once the cache is open; stops at end of input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lmplug
from lmplug.testing import reference_kv

from p2p_testing import prompt


def main() -> None:
    config: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    with lmplug.SyncCache(config, backend=sys.argv[2]) as cache:  # type: ignore[arg-type]
        print("ready", flush=True)
        for line in sys.stdin:
            command, _, rest = line.partition(" ")
            if command.endswith("-tokens"):
                tokens = json.loads(rest)
                command = command.removesuffix("-tokens")
            else:
                seed, chunks = rest.split()
                tokens = prompt(int(seed), int(chunks))
            if command == "store":
                cache.store(tokens, reference_kv(tokens, config))
            elif command == "evict":
                cache.evict(tokens)
            print("ok", flush=True)


if __name__ == "__main__":
    main()
