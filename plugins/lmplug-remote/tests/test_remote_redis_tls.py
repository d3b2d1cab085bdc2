"""``rediss://`` against a real TLS redis-server (a throwaway CA and certificate made with openssl)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import lmplug
from lmplug.testing import free_port, make_config, reference_kv

REDIS = shutil.which("redis-server")
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    REDIS is None or OPENSSL is None, reason="needs redis-server (apt-get install redis-server) and openssl"
)
CHUNK = 16


def _openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run([str(OPENSSL), *arguments], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS on loopback; yields its port and the CA that signed it."""
    folder = tmp_path_factory.mktemp("tls-redis")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=lmplug test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", "san.ext", "-out", "server.crt", cwd=folder)  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        [str(REDIS), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder), "--tls-cert-file", "server.crt", "--tls-key-file",
         "server.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the TLS redis-server did not start") from None
                time.sleep(0.05)
        yield port, folder / "ca.crt"
    finally:
        process.terminate()
        process.wait(timeout=10)


def config(url: str, connector: dict[str, object]) -> dict[str, object]:
    remote = {"type": "remote", "url": url, "timeout": "2s", "connector": connector}
    return make_config([{"type": "cpu", "capacity": "4MiB"}, remote], chunk_size=CHUNK)


async def test_two_caches_share_kv_over_tls(tls_redis: tuple[int, Path], anyio_backend: str) -> None:
    port, ca = tls_redis
    stack = config(f"rediss://127.0.0.1:{port}/0", {"tls": {"ca_file": str(ca)}})
    tokens = [(i * 7 + len(anyio_backend)) % 30_000 for i in range(3 * CHUNK)]
    kv = reference_kv(tokens, stack)
    async with lmplug.open_cache(stack) as first:
        await first.store(tokens, kv)
        await first.drain()
    async with lmplug.open_cache(stack) as second:
        got, hit = await second.retrieve(tokens)
    assert hit == len(tokens)
    assert torch.equal(got, kv)


async def test_an_untrusted_certificate_is_a_miss_not_a_crash(tls_redis: tuple[int, Path]) -> None:
    port, _ = tls_redis
    stack = config(f"rediss://127.0.0.1:{port}/0", {})  # the system CAs do not know the test CA
    tokens = list(range(1000, 1000 + CHUNK))
    async with lmplug.open_cache(stack) as cache:
        await cache.store(tokens, reference_kv(tokens, stack))
        await cache.drain()
        await cache.evict(tokens, tiers=["cpu"])
        assert await cache.lookup(tokens) == 0
        assert cache.statistics().tiers[1].errors >= 1


async def test_plain_redis_against_a_tls_port_is_a_miss(tls_redis: tuple[int, Path]) -> None:
    port, _ = tls_redis
    stack = config(f"redis://127.0.0.1:{port}/0", {})
    tokens = list(range(2000, 2000 + CHUNK))
    async with lmplug.open_cache(stack) as cache:
        assert await cache.lookup(tokens) == 0
        await cache.store(tokens, reference_kv(tokens, stack))  # L1 still serves
        assert (await cache.retrieve(tokens))[1] == CHUNK
