"""The lookup channel between vLLM's scheduler and the worker's cache, over a real Unix socket."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lmplug
from lmplug.integrations.vllm.lookup import REPLY, REQUEST, LookupClient, LookupServer
from lmplug.testing import make_config, reference_kv

CHUNK = 16


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_lookups_lease_until_released(tmp_path: Path, backend: str) -> None:
    config = make_config(chunk_size=CHUNK)
    path = tmp_path / "lookup.sock"
    tokens = list(range(3 * CHUNK))
    with lmplug.SyncCache(config, backend=backend) as cache:  # type: ignore[arg-type]
        cache.store(tokens, reference_kv(tokens, config))
        server = LookupServer(cache.async_cache, path)
        cache.start_background(server.serve)
        client = LookupClient(path, timeout=5)
        assert path.exists()  # start_background returns once the server listens
        assert client.lookup("req-1", [*tokens, 7, 7]) == 3 * CHUNK
        assert client.lookup("req-2", list(range(1000, 1100))) == 0
        assert cache.statistics().tiers[0].pinned == 3
        stats = client.statistics()  # what a leak check in another process sees
        assert (stats["requests_with_leases"], stats["leases"]) == (1, 1)
        assert stats["tiers"][0]["pinned"] == 3  # type: ignore[index]
        cache.run_sync(lambda: server.release("req-1"))
        assert cache.statistics().tiers[0].pinned == 0
        assert client.statistics()["leases"] == 0
        # A malformed frame closes that connection only; the next lookup reconnects.
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(path))
        raw.sendall(REQUEST.pack(b"JUNK", 0, 0, 0))
        assert raw.recv(REPLY.size) == b""
        raw.close()
        assert client.lookup("req-3", tokens) == 3 * CHUNK
        stats = client.statistics()
        assert stats["lookups"]["count"] == 3  # type: ignore[index]
        assert stats["lookups"]["samples"] == 2  # type: ignore[index]  # each lookup reports the one before
        client.close()
    assert not path.exists()  # the socket is removed when the cache closes


def test_no_worker_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = LookupClient(tmp_path / "absent.sock", timeout=0.5)
    assert client.lookup("req", list(range(100))) == 0
    assert client.lookup("req", list(range(100))) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if "lookup channel failed" in r.getMessage()]) == 1  # once, not per lookup


@contextlib.contextmanager
def cpu_and_disk(tmp_path: Path, backend: str, tokens: list[int], in_memory: int) -> Iterator[lmplug.SyncCache]:
    """A cpu+disk cache holding ``tokens`` on disk, and only their first ``in_memory`` tokens in host memory."""
    config = make_config(
        [{"type": "cpu", "capacity": "1MiB"}, {"type": "disk", "path": str(tmp_path / "kv")}], chunk_size=CHUNK
    )
    with lmplug.SyncCache(config, backend=backend) as cache:  # type: ignore[arg-type]
        kv = reference_kv(tokens, config)
        cache.store(tokens, kv)
        cache.drain()
        cache.evict(tokens, tiers=["cpu"])
        if in_memory:
            cache.store(tokens[:in_memory], kv[:, :, :in_memory])
        assert cache.statistics().tiers[0].chunks == in_memory // CHUNK
        yield cache


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_lower_tier_hit_is_pending_until_promoted_and_never_blocks(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "lookup.sock"
    tokens = list(range(6 * CHUNK))
    with cpu_and_disk(tmp_path, backend, tokens, in_memory=0) as cache:
        server = LookupServer(cache.async_cache, path, wait=0.0)  # answer at once: pending
        cache.start_background(server.serve)
        client = LookupClient(path, timeout=5)
        assert client.lookup("req", tokens) is None  # being promoted; vLLM asks again next step
        answers = []
        for _ in range(200):
            answer = client.lookup("req", tokens)
            answers.append(answer)
            if answer is not None:
                break
            time.sleep(0.01)
        assert answers[-1] == 6 * CHUNK
        lease = cache.run_sync(lambda: server.lease("req"))
        assert lease is not None
        assert sum(chunk.num_tokens for chunk in lease.chunks) == 6 * CHUNK
        assert cache.statistics().tiers[0].chunks == 6  # promoted into host memory
        cache.run_sync(lambda: server.release("req"))
        assert cache.statistics().leases == 0
        client.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_past_the_deadline_a_lookup_answers_what_arrived(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "lookup.sock"
    tokens = list(range(4 * CHUNK))
    with cpu_and_disk(tmp_path, backend, tokens, in_memory=2 * CHUNK) as cache:
        server = LookupServer(cache.async_cache, path, wait=0.0, deadline=0.05)
        cache.start_background(server.serve)
        client = LookupClient(path, timeout=5)
        started = time.monotonic()
        hit = client.lookup("req", tokens)
        while hit is None and time.monotonic() - started < 5:
            time.sleep(0.01)
            hit = client.lookup("req", tokens)
        assert hit is not None  # past the deadline: never pending
        assert 2 * CHUNK <= hit <= 4 * CHUNK  # host memory's share at least
        cache.run_sync(lambda: server.release_all())
        client.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_peer_tier_is_asked_off_the_schedulers_path(tmp_path: Path, backend: str) -> None:
    """A p2p tier's lookup crosses the network (the controller): it runs beside the scheduler,
    which gets "pending" at once from a controller that hangs (SIGSTOP), not after the p2p
    tier's 1 s lookup time-out, and a miss after it."""
    pytest.importorskip("lmplug_p2p", reason="the p2p tier comes with lmplug-p2p")
    from lmplug_controller.testing import ControllerProcess, http_json

    controller = ControllerProcess(tmp_path / "controller").start()
    path = tmp_path / "lookup.sock"
    stack = [
        {"type": "cpu", "capacity": "1MiB"},
        {"type": "p2p", "controller": controller.url, "instance_id": "me", "lookup_timeout": 1.0},
    ]
    try:
        with lmplug.SyncCache(make_config(stack, chunk_size=CHUNK), backend=backend) as cache:  # type: ignore[arg-type]
            server = LookupServer(cache.async_cache, path, wait=0.0)
            cache.start_background(server.serve)
            client = LookupClient(path, timeout=5)
            try:
                deadline = time.monotonic() + 10
                while not cache.run_sync(lambda: http_json(controller.url, "GET", "/v1/instances"))[1]["instances"]:
                    assert time.monotonic() < deadline, "the p2p tier did not register"
                    time.sleep(0.05)
                assert controller.process is not None
                controller.process.send_signal(signal.SIGSTOP)
                started = time.monotonic()
                assert client.lookup("req", list(range(4 * CHUNK))) is None  # pending, not blocked
                assert time.monotonic() - started < 0.5
                answer = None
                while answer is None and time.monotonic() - started < 5:
                    time.sleep(0.05)
                    answer = client.lookup("req", list(range(4 * CHUNK)))
                assert answer == 0  # the controller's time-out: a miss
            finally:
                client.close()
                if controller.process is not None:
                    controller.process.send_signal(signal.SIGCONT)
    finally:
        controller.stop()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_client_that_never_releases_cannot_hold_more_than_the_limit(tmp_path: Path, backend: str) -> None:
    """Leases under ever new request ids are bounded: past the limit a lookup is a miss (counted
    and logged), and room comes back when leases are released or expire."""
    config = make_config(chunk_size=CHUNK, lease_timeout=2.0)
    path = tmp_path / "lookup.sock"
    tokens = list(range(2 * CHUNK))
    with lmplug.SyncCache(config, backend=backend) as cache:  # type: ignore[arg-type]
        cache.store(tokens, reference_kv(tokens, config))
        server = LookupServer(cache.async_cache, path, max_requests=3)
        cache.start_background(server.serve)
        client = LookupClient(path, timeout=5)
        assert [client.lookup(f"r{i}", tokens) for i in range(3)] == [2 * CHUNK] * 3
        assert client.lookup("r3", tokens) == 0  # full: a miss, never an error
        assert client.lookup("r0", tokens) == 2 * CHUNK  # a held request is answered as before
        stats = client.statistics()
        assert stats["requests_with_leases"] == 3
        assert stats["lookups"]["refused_full"] == 1  # type: ignore[index]
        client.release("r0")
        assert client.lookup("r4", tokens) == 2 * CHUNK  # released: room again
        time.sleep(2.3)  # the leases expire (nobody released them)
        assert client.lookup("r5", tokens) == 2 * CHUNK  # expired leases make room
        assert client.statistics()["requests_with_leases"] == 1
        client.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_channel_tells_a_pd_transfers_state(tmp_path: Path, backend: str, third_party_plugins: Path) -> None:
    """What the decode's scheduler asks while it waits for pushed KV: the worker's receiver's word."""
    stack = [{"type": "cpu", "capacity": "1MiB"}, {"type": "memo-push", "name": "pd"}]
    config = make_config(stack, chunk_size=CHUNK)
    path = tmp_path / "lookup.sock"
    with lmplug.SyncCache(config, backend=backend) as cache:  # type: ignore[arg-type]
        server = LookupServer(cache.async_cache, path)
        cache.start_background(server.serve)
        tokens = list(range(2 * CHUNK))
        cache.store(tokens, reference_kv(tokens, config))
        client = LookupClient(path)
        transfer = f"lookup-{backend}"  # the memo tier's record of transfers is per process
        try:
            assert client.transfer_state(transfer) is None
            assert (
                cache.call(lambda: cache.async_cache.push(tokens, destination="d", transfer_id=transfer, timeout=5))
                == 2 * CHUNK
            )
            assert client.transfer_state(transfer) == "completed"
        finally:
            client.close()
    assert LookupClient(tmp_path / "gone.sock").transfer_state("any") is None  # no worker: unknown
