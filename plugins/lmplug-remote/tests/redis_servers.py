"""Real Redis servers for the tests: one redis-server, and a three-node Redis Cluster, on loopback.

Each server is a ``redis-server`` subprocess these fixtures own (not daemonized, no persistence,
its own temporary directory); every one is stopped when its fixture ends, also after a failure.
Without ``redis-server`` the tests that need one are skipped (CI installs it).
"""

from __future__ import annotations

import contextlib
import random
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["redis_cluster", "redis_server", "redis_servers", "stalling_proxy"]

_START_TIMEOUT = 10.0


def find_redis_server() -> str | None:
    """The redis-server binary, or None."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, its bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20_000, 50_000)
        if _bindable(port) and (not cluster or _bindable(port + 10_000)):
            return port
    raise RuntimeError("no free loopback port found")


class RedisServer:
    """One redis-server process; :meth:`start` after :meth:`kill` comes back on the same port (empty)."""

    def __init__(self, binary: str, directory: Path, *, password: str | None = None, cluster: bool = False) -> None:
        self.binary = binary
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.cluster = cluster
        self.port = free_port(cluster)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{self.address}"

    def command(self) -> list[str]:
        arguments = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        arguments += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.password:
            arguments += ["--requirepass", self.password]
        if self.cluster:
            arguments += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            arguments += ["--cluster-node-timeout", "5000"]
        return arguments

    def client(self) -> redis.Redis:
        """A plain redis-py client of this server (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def start(self) -> None:
        if self.cluster:
            (self.directory / "nodes.conf").unlink(missing_ok=True)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + _START_TIMEOUT
        with self.client() as client:
            while True:
                if self.process.poll() is not None:
                    error = self.process.stderr.read().decode() if self.process.stderr else ""
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    self._reap()
                    raise RuntimeError(f"redis-server on port {self.port} exited: {error}{log}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer in {_START_TIMEOUT} s")
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash (its data is gone: no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()


class RedisClusterServers:
    """Three redis-server nodes with the 16384 slots split between them (no replicas)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.nodes = [RedisServer(binary, directory / f"node{i}", cluster=True) for i in range(3)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        bounds = [0, 5461, 10923, 16384]
        for index, node in enumerate(self.nodes):
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1)
        with self.nodes[0].client() as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + 30
        while not all(self._ready(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.05)

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        with node.client() as client:
            info = client.cluster("INFO")
        return bool(info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == 3)

    def client(self) -> redis.RedisCluster:
        """A plain redis-py cluster client (the caller closes it)."""
        first = self.nodes[0]
        return redis.RedisCluster(host="127.0.0.1", port=first.port, socket_timeout=5)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()


def _binary() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Start extra redis-servers (``redis_servers(password=...)``); all stopped at the end of the session."""
    binary = _binary()
    started: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        server = RedisServer(binary, tmp_path_factory.mktemp("redis"), password=password)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.stop()


@pytest.fixture(scope="session")
def redis_server(redis_servers: Callable[..., RedisServer]) -> RedisServer:
    """One shared redis-server without a password (tests flush it or use their own keys)."""
    return redis_servers()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A three-node Redis Cluster, shared by the session."""
    cluster = RedisClusterServers(_binary(), tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class StallingProxy:
    """A loopback TCP relay to a server that passes only ``allowance`` bytes of replies, then holds
    the rest until :meth:`release`: a reply cut off mid-value, as a slow network makes it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.allowance: int | None = None  # None: no limit
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._released = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stall_after(self, count: int) -> None:
        self._released.clear()
        self.allowance = count

    def release(self) -> None:
        self.allowance = None
        self._released.set()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, server]
            thread = threading.Thread(target=self._relay, args=(client, server), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, server)
            selector.register(server, selectors.EVENT_READ, client)
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    sink: socket.socket = key.data
                    limit = 1 << 16
                    if source is server and self.allowance is not None:
                        if self.allowance <= 0:
                            self._released.wait(0.05)
                            continue
                        limit = min(limit, self.allowance)
                    try:
                        data = source.recv(limit)
                        if not data:
                            return
                        if source is server and self.allowance is not None:
                            self.allowance -= len(data)
                        sink.sendall(data)
                    except OSError:
                        return

    def close(self) -> None:
        self._stop.set()
        self._released.set()
        self._accepting.join()
        for thread in self._threads:
            thread.join()
        for sock in [self._listener, *self._sockets]:
            sock.close()


@pytest.fixture
def stalling_proxy(redis_server: RedisServer) -> Iterator[StallingProxy]:
    """A :class:`StallingProxy` to the shared redis-server, closed after the test."""
    proxy = StallingProxy(redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()
