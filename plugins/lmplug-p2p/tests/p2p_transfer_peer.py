"""A peer in its own process: serves ``count`` chunks of ``make_kv`` until stdin closes or it is killed.

Usage: ``python p2p_transfer_peer.py DTYPE COUNT TOKENS LAYERS``; prints its endpoint on the first line.
"""

from __future__ import annotations

import sys

import anyio
import torch

from lmplug_p2p.transfer import TransferServer

from p2p_transfer_testing import FINGERPRINT, Holder, make_layout


async def main(dtype: str, count: int, tokens: int, layers: int) -> None:
    layout = make_layout(getattr(torch, dtype), layers)
    holder = Holder(layout, [tokens] * count)
    async with TransferServer(holder.serve, holder.contains, fingerprint=FINGERPRINT, layout=layout) as server:
        print(server.endpoint, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
