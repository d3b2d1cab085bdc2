"""The lookup channel between vLLM's scheduler and the worker's cache, over a real Unix socket."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

import lmplug
from lmplug.integrations.vllm.lookup import REPLY, LookupClient, LookupServer
from lmplug.testing import make_config, reference_kv

CHUNK = 16


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_lookups_lease_until_released(tmp_path: Path, backend: str) -> None:
    config = make_config(chunk_size=CHUNK)
    path = tmp_path / "lookup.sock"
    tokens = list(range(3 * CHUNK))
    with lmplug.SyncCache(config, backend=backend) as cache:  # type: ignore[arg-type]
        cache.store(tokens, reference_kv(tokens, config))
        server = LookupServer(cache.cache, path)
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
        raw.sendall(struct.pack("<4sHI", b"JUNK", 0, 0))
        assert raw.recv(REPLY.size) == b""
        raw.close()
        assert client.lookup("req-3", tokens) == 3 * CHUNK
        client.close()
    assert not path.exists()  # the socket is removed when the cache closes


def test_no_worker_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = LookupClient(tmp_path / "absent.sock", timeout=0.5)
    assert client.lookup("req", list(range(100))) == 0
    assert client.lookup("req", list(range(100))) == 0
    assert len([r for r in caplog.records if "lookup channel failed" in r.getMessage()]) == 1
