"""Peers in separate processes: a controller process, instance A in another (a ``SyncCache``), and
instance B in this one. B fetches what A stores; the controller restarts and A registers again;
A dies and B's lookups and fetches are misses, not errors or hangs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug.testing import reference_kv
from lmplug_controller.testing import ControllerProcess

from p2p_testing import config, eventually, looks_up, prompt

HERE = Path(__file__).parent


class Peer:
    """Instance A: ``p2p_peer.py`` in its own process."""

    def __init__(self, directory: Path, stack: dict[str, Any], backend: str) -> None:
        path = directory / "peer.json"
        path.write_text(json.dumps(stack))
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "p2p_peer.py"), str(path), backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def command(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        assert self.readline() == "ok"

    def kill(self) -> None:
        self.process.kill()
        self.close()

    def close(self) -> None:
        """End its input (it stops), wait for it, close the pipes."""
        process = self.process
        for pipe in (process.stdin, process.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    process = ControllerProcess(tmp_path / "controller", "--heartbeat", "0.2").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def peer(tmp_path: Path, controller: ControllerProcess, anyio_backend: str) -> Iterator[Peer]:
    started = Peer(tmp_path, config(controller.url, "a"), anyio_backend)
    try:
        yield started
    finally:
        started.close()


async def test_kv_crosses_processes_and_survives_a_controller_restart(
    controller: ControllerProcess, peer: Peer
) -> None:
    reference = config(controller.url, "b")
    async with lmplug.open_cache(reference) as b:
        tokens = prompt(1, 4)
        await anyio.to_thread.run_sync(peer.command, "store 1 4")
        await eventually(looks_up(b, tokens, len(tokens)))
        got, count = await b.retrieve(tokens)
        assert count == len(tokens)
        assert torch.equal(got, reference_kv(tokens, reference))

        controller.kill()
        later = prompt(2, 3)
        await anyio.to_thread.run_sync(peer.command, "store 2 3")  # while the controller is down
        assert await b.lookup(later) == 0
        await anyio.to_thread.run_sync(controller.start)  # same port; A registers again with a snapshot
        await eventually(looks_up(b, later, len(later)), limit=15)
        got, count = await b.retrieve(later)
        assert count == len(later)
        assert torch.equal(got, reference_kv(later, reference))


async def test_a_peer_that_dies_costs_misses_and_is_forgotten(controller: ControllerProcess, peer: Peer) -> None:
    async with lmplug.open_cache(config(controller.url, "b")) as b:
        tokens = prompt(3, 4)
        await anyio.to_thread.run_sync(peer.command, "store 3 4")
        await eventually(looks_up(b, tokens, len(tokens)))
        peer.kill()
        with anyio.fail_after(5):  # the controller may still list A: the fetch fails, a miss
            assert (await b.retrieve(tokens))[1] == 0
        await eventually(looks_up(b, tokens, 0), limit=5)  # dropped after its missed heartbeats
