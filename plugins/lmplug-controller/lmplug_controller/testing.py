"""Test helpers: controllers in this event loop or in their own process, and workers whose
tiers are plain sets, for the controller's tests and for tests of its clients (lmplug-p2p's).

:func:`running_controller` serves a :class:`~lmplug_controller.server.Controller` as a task
(asyncio or trio); :class:`ControllerProcess` runs ``lmplug-controller`` as a process (kill it,
start it again on the same port); the ``controller_processes`` fixture starts such processes
for one test and stops what is left. :class:`MemoryWorker` is a worker whose tiers are sets,
wired to a :class:`~lmplug_controller.client.ControllerClient`; :func:`running_worker` runs one.
Needs pytest (for the fixture).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

from lmplug_controller import TOKEN_ENV
from lmplug_controller.client import ControllerClient
from lmplug_controller.protocol import TierInfo
from lmplug_controller.server import Controller, ControllerConfig

__all__ = [
    "ControllerProcess",
    "MemoryWorker",
    "controller_processes",
    "eventually",
    "http_json",
    "make_keys",
    "running_controller",
    "running_worker",
]

_READY = re.compile(r"lmplug-controller ready on http://([\d.]+):(\d+) \(workers: (\S+);")
_START_LIMIT = 30.0
FAST = ControllerConfig(port=0, heartbeat_seconds=0.1, missed_heartbeats=10, command_timeout=1.0)
"""A controller for tests: free port, 0.1 s heartbeats, workers dropped after 1 s, 1 s command timeout."""


def make_keys(prompt: str, count: int, fingerprint: bytes = b"fp-test0") -> list[bytes]:
    """``count`` chained 24-byte keys of ``prompt`` under ``fingerprint``, as lmplug makes them:
    each key depends on all those before it."""
    keys = []
    previous = b""
    for position in range(count):
        previous = hashlib.blake2b(previous + f"{prompt}/{position}".encode(), digest_size=16).digest()
        keys.append(fingerprint + previous)
    return keys


async def eventually(predicate: Callable[[], object], within: float = 5.0, step: float = 0.01) -> None:
    """Return once ``predicate()`` is true; :class:`TimeoutError` after ``within`` seconds."""
    for _ in range(max(1, int(within / step))):
        if predicate():
            return
        await anyio.sleep(step)
    if not predicate():
        raise TimeoutError(f"still false after {within:g} s")


async def http_json(url: str, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, Any]:
    """``(status, decoded JSON or text)`` of one request made with the standard library's
    ``http.client`` in a worker thread: a client that shares no code with the controller."""
    host, port = url.removeprefix("http://").split(":")

    def call() -> tuple[int, bytes, str]:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            headers = {"Content-Type": "application/json"}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("Content-Type", "")
        finally:
            connection.close()

    status, data, kind = await anyio.to_thread.run_sync(call)
    return status, json.loads(data) if kind.startswith("application/json") else data.decode()


@contextlib.asynccontextmanager
async def running_controller(config: ControllerConfig = FAST, **changes: Any) -> AsyncIterator[Controller]:
    """A controller serving in this event loop until the block ends; ``changes`` override ``config``."""
    controller = Controller(dataclasses.replace(config, **changes))
    async with anyio.create_task_group() as group:
        await group.start(controller.serve)
        try:
            yield controller
        finally:
            controller.shutdown()


class MemoryWorker:
    """A worker whose tiers are sets of keys, reporting to the controller through a real client."""

    def __init__(
        self,
        url: str,
        instance_id: str,
        *,
        fingerprint: bytes = b"fp-test0",
        rank: int = 0,
        tiers: Sequence[TierInfo] = (TierInfo("cpu", "cpu", 1 << 30), TierInfo("disk", "disk", 8 << 30)),
        token: str | None = None,
        heartbeat_seconds: float = 0.1,
        lookup_timeout: float = 0.2,
    ) -> None:
        self.held: dict[str, set[bytes]] = {tier.name: set() for tier in tiers}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.command_delay = 0.0
        self.hits = 0
        self.client = ControllerClient(
            url,
            instance_id=instance_id,
            fingerprint=fingerprint,
            rank=rank,
            tiers=tiers,
            endpoint=f"127.0.0.1:{7000 + rank}/{instance_id}",
            snapshot=self.snapshot,
            on_command=self.on_command,
            token=token,
            heartbeat_seconds=heartbeat_seconds,
            lookup_timeout=lookup_timeout,
            stats=self.stats,
        )

    def admit(self, tier: str, keys: Sequence[bytes]) -> None:
        self.held[tier].update(keys)
        self.client.admitted(tier, keys)

    def evict(self, tier: str, keys: Sequence[bytes]) -> None:
        self.held[tier].difference_update(keys)
        self.client.evicted(tier, keys)

    async def snapshot(self) -> dict[str, list[bytes]]:
        return {tier: sorted(keys) for tier, keys in self.held.items()}

    def stats(self) -> dict[str, Any]:
        return {
            "tiers": {
                tier: {"used_bytes": len(keys) * 4096, "chunks": len(keys), "hits": self.hits, "misses": 1}
                for tier, keys in self.held.items()
            }
        }

    async def on_command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.commands.append((op, args))
        if self.command_delay:
            await anyio.sleep(self.command_delay)
        if op == "clear":
            keys = set(args.get("keys", ()))
            dropped = {}
            for tier in args.get("tiers") or list(self.held):
                gone = self.held[tier] & keys if keys else set(self.held[tier])
                self.evict(tier, sorted(gone))
                dropped[tier] = len(gone)
            return {"dropped": dropped}
        if op == "fetch":
            self.admit(next(iter(self.held)), args["keys"])
            return {"fetched": len(args["keys"]), "from": args["endpoint"]}
        if op == "health":
            return {"tiers": {tier: len(keys) for tier, keys in self.held.items()}}
        if op == "fail":
            raise RuntimeError("asked to fail")
        return {"op": op}


@contextlib.asynccontextmanager
async def running_worker(worker: MemoryWorker, *, registered: bool = True) -> AsyncIterator[MemoryWorker]:
    """Run ``worker``'s client until the block ends; first wait (up to 5 s) until it has registered."""
    async with anyio.create_task_group() as group:
        await group.start(worker.client.run)
        if registered:
            with anyio.fail_after(5):
                await worker.client.wait_connected()
        try:
            yield worker
        finally:
            group.cancel_scope.cancel()


class ControllerProcess:
    """One ``lmplug-controller`` process; :meth:`start` again after :meth:`kill` reuses its HTTP port."""

    def __init__(self, directory: Path, *arguments: str) -> None:
        self.directory = directory
        self.arguments = arguments
        self.command = (str(Path(sys.executable).parent / "lmplug-controller"),)
        self.env = dict(os.environ)
        self.env.pop(TOKEN_ENV, None)
        self.port = 0
        self.zmq = ""
        self.process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.log_path = directory / "controller.log"
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ControllerProcess:
        if self.process is not None:
            raise RuntimeError("already running")
        self._log = self.log_path.open("a")
        command = [*self.command, "--host", "127.0.0.1", "--port", str(self.port), *self.arguments]
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env)
        except BaseException:
            self._close()
            raise
        self.process = process
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(_START_LIMIT)
        match = _READY.search(line[0]) if line else None
        if match is None:
            self.kill()
            raise RuntimeError(f"lmplug-controller did not start: {line!r}; log:\n{self.log_path.read_text()[-3000:]}")
        self.port = int(match.group(2))
        self.zmq = match.group(3)
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the controller and wait for it; its exit status."""
        process = self.process
        if process is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        self._close()
        return status

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class _Factory:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[ControllerProcess] = []

    def __call__(self, *arguments: str, start: bool = True) -> ControllerProcess:
        process = ControllerProcess(self.directory / f"controller-{len(self.started)}", *arguments)
        self.started.append(process)
        return process.start() if start else process

    def close(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def controller_processes(tmp_path: Path) -> Iterator[_Factory]:
    """``controller_processes("--heartbeat", "0.1")`` starts a controller process for this test only."""
    factory = _Factory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
