"""Real ``lmplug-server`` processes on loopback for the ``lm://`` tests.

``lm_server`` is one server for the whole session (256 MiB, no auth, metrics on);
``lm_auth_server`` another that needs a token, started through ``lmplug server`` (the CLI
sub-command) with the token in ``LMPLUG_SERVER_TOKEN``; ``lm_servers`` starts throwaway
servers for one test (small capacities, a disk store, kills and restarts) and stops
whatever is left when the test ends. Each server picks a free port (``--port 0``) and
reports it on its ready line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

__all__ = ["lm_auth_server", "lm_server", "lm_servers", "lm_url"]

LM_TOKEN = "lm-test-token"
_READY = re.compile(r"lmplug-server ready on lm://([\d.]+):(\d+)(?:.*metrics on http://[\d.]+:(\d+))?")
_START_LIMIT = 60.0


class LmServerProcess:
    """One server process; :meth:`start` again after :meth:`kill` or :meth:`stop` reuses its port."""

    def __init__(self, directory: Path, *arguments: str, command: tuple[str, ...] | None = None) -> None:
        self.directory = directory
        self.arguments = arguments
        self.command = command or (str(Path(sys.executable).parent / "lmplug-server"),)
        self.env = dict(os.environ)
        self.port = 0
        self.metrics_port: int | None = None
        self.process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.log_path = directory / "server.log"
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def start(self) -> LmServerProcess:
        if self.process is not None:
            raise RuntimeError("already running")
        self._log = self.log_path.open("a")
        process = subprocess.Popen(
            [*self.command, "--host", "127.0.0.1", "--port", str(self.port), *self.arguments],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=self.env,
        )
        self.process = process
        assert process.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(_START_LIMIT)
        match = _READY.search(line[0]) if line else None
        if match is None:
            self.kill()
            raise RuntimeError(f"lmplug-server did not start: {line!r}; log:\n{self.log_path.read_text()[-3000:]}")
        self.port = int(match.group(2))
        self.metrics_port = int(match.group(3)) if match.group(3) else None
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; its exit status."""
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
        """``kill -9``."""
        self.stop(signal.SIGKILL)

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class ServerFactory:
    """Starts servers for one test; stops them all at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[LmServerProcess] = []

    def __call__(self, *arguments: str, start: bool = True) -> LmServerProcess:
        server = LmServerProcess(self.directory / f"server-{len(self.started)}", *arguments)
        self.started.append(server)
        return server.start() if start else server

    def close(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture(scope="session")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmServerProcess]:
    """A session-wide server: 256 MiB of memory, 64 MiB values at most, metrics on."""
    server = LmServerProcess(
        tmp_path_factory.mktemp("lm-server"), "--capacity", "256MiB", "--max-value", "64MiB", "--metrics-port", "0"
    )
    server.env.pop("LMPLUG_SERVER_TOKEN", None)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def lm_url(lm_server: LmServerProcess) -> str:
    return lm_server.url


@pytest.fixture(scope="session")
def lm_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmServerProcess]:
    """A server that needs :data:`LM_TOKEN`, run as ``lmplug server`` with the token from the environment."""
    lmplug = str(Path(sys.executable).parent / "lmplug")
    server = LmServerProcess(
        tmp_path_factory.mktemp("lm-auth-server"), "--capacity", "32MiB", command=(lmplug, "server")
    )
    server.env["LMPLUG_SERVER_TOKEN"] = LM_TOKEN
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def lm_servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """``lm_servers("--capacity", "1MiB", ...)`` starts a server for this test only."""
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
