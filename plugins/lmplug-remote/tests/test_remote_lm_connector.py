"""The ``lm://`` connector against real servers: frames split by the server's limits, errors
named, auth from options or the environment, dead servers, cancelled calls, bad URLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import lmplug
from lmplug.testing import free_port
from lmplug_remote.lm import LmOptions
from lmplug_remote.lm.connector import LmConnector
from lmplug_server.fuzzing import check_server
from lmplug_server.protocol import Limits
from lmplug_server.server import ServerConfig
from lmplug_server.testing import LM_TOKEN, LmServerProcess, serving


def value(index: int, size: int) -> bytes:
    return bytes((index * 7 + i) % 251 for i in range(size))


async def test_a_batch_larger_than_one_frame_is_sent_in_several() -> None:
    """put_many (the tier's writers) splits a batch by the server's max_frame and max_keys."""
    limits = Limits(max_keys=3, max_value=3000, max_frame=7000)
    async with serving(ServerConfig(port=0, capacity=1 << 20, limits=limits)) as server:
        assert server.address is not None
        async with LmConnector(f"lm://127.0.0.1:{server.address[1]}", LmOptions()) as client:
            entries = [(f"f{index}", [memoryview(value(index, 2000 + index))]) for index in range(10)]
            await client.put_many(entries, None)
            for index in range(10):
                buffer = bytearray(3000)
                assert await client.get_into(f"f{index}", [memoryview(buffer)]) == 2000 + index
                assert buffer[: 2000 + index] == value(index, 2000 + index)
            stats = await client.server_statistics()
            assert stats["requests"]["PUT"] == 4  # 3 values (about 6 KiB) per frame at most: 3 + 3 + 3 + 1
            with pytest.raises(lmplug.TierUnavailable, match="exceeds max_value"):
                await client.put_many([("big", [memoryview(bytes(3001))])], None)


async def test_a_value_larger_than_the_servers_capacity_is_named() -> None:
    async with serving(ServerConfig(port=0, capacity=1 << 20)) as server:
        assert server.address is not None
        async with LmConnector(f"lm://127.0.0.1:{server.address[1]}", LmOptions()) as client:
            with pytest.raises(lmplug.TierUnavailable, match="larger than the server's whole capacity"):
                await client.put("huge", [memoryview(bytes((1 << 20) + 1))], None)
            assert await client.exists(["huge"]) == [False]
        await check_server(server.address[1], None, {})  # nothing reserved for it, no connection left open


async def test_a_get_larger_than_the_buffers_is_corrupt_chunk_and_sends_nothing(lm_server: LmServerProcess) -> None:
    sentinel = f"sentinel-{os.getpid()}"
    async with LmConnector(lm_server.url, LmOptions(connections=1)) as client:
        await client.put(sentinel, [memoryview(os.urandom(100_000))], None)
        with pytest.raises(lmplug.CorruptChunk, match="more than the 1000 expected"):
            await client.get_into(sentinel, [memoryview(bytearray(1000))])
        assert await client.exists([sentinel]) == [True]  # the same connection is still in step
        assert client.statistics()["connections_opened"] == 1


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_the_connector_names_a_failed_auth(
    lm_auth_server: LmServerProcess, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LMPLUG_SERVER_TOKEN", raising=False)
    async with LmConnector(lm_auth_server.url, LmOptions(auth_token=token)) as client:
        with pytest.raises(lmplug.TierUnavailable, match="AUTH_FAILED"):
            await client.exists(["k"])


async def test_the_right_token_works_from_options_or_environment(
    lm_auth_server: LmServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LmConnector(lm_auth_server.url, LmOptions(auth_token=LM_TOKEN)) as client:
        await client.put("authed", [memoryview(b"secret value")], None)
    monkeypatch.setenv("LMPLUG_SERVER_TOKEN", LM_TOKEN)
    async with LmConnector(lm_auth_server.url, LmOptions()) as client:
        buffer = bytearray(64)
        assert await client.get_into("authed", [memoryview(buffer)]) == 12
        assert buffer[:12] == b"secret value"


async def test_a_dead_server_is_tier_unavailable_at_once() -> None:
    port = free_port()  # nothing listens here
    async with LmConnector(f"lm://127.0.0.1:{port}", LmOptions()) as client:
        with pytest.raises(lmplug.TierUnavailable, match=r"[Cc]onnection refused"):
            await client.exists(["k"])
        with pytest.raises(lmplug.TierUnavailable):
            await client.put("k", [memoryview(b"v")], None)


async def test_a_call_cancelled_mid_frame_drops_its_connection(lm_server: LmServerProcess) -> None:
    async with LmConnector(lm_server.url, LmOptions(connections=1)) as client:
        assert await client.exists(["warm-up"]) == [False]  # the one connection is open and idle
        big = memoryview(bytes(48 << 20))
        # The server is stopped, so the 48 MiB frame stalls once the socket buffers are full: the
        # call is certainly cancelled mid-frame (one cancelled before its first byte keeps its
        # connection, rightly).
        assert lm_server.process is not None
        lm_server.process.send_signal(signal.SIGSTOP)
        try:
            with anyio.move_on_after(0.2):
                await client.put("cancelled", [big], None)
        finally:
            lm_server.process.send_signal(signal.SIGCONT)
        assert client.statistics()["connections_dropped"] == 1
        # The next call must not read the previous call's reply (or write into its frame).
        await client.put("after-cancel", [memoryview(b"ok")], None)
        buffer = bytearray(2)
        assert await client.get_into("after-cancel", [memoryview(buffer)]) == 2
        assert buffer == b"ok"
        assert client.statistics()["connections_opened"] == 2
    # The server gave back what it reserved for the cut-off value, and closed its connection.
    await check_server(lm_server.port, None, {b"after-cancel": b"ok"})


@pytest.mark.parametrize("url", ["lm://", "lm://host:99999", "lm://host/path", "lm://user:pw@host", "redis://host"])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(lmplug.ConfigError):
        LmConnector(url, LmOptions())


def test_lmplug_server_runs_as_an_lmplug_sub_command(tmp_path: Path) -> None:
    """lmplug-remote registers ``lmplug server``; it starts the same server."""
    lmplug_cli = str(Path(sys.executable).parent / "lmplug")
    server = LmServerProcess(tmp_path, "--capacity", "8MiB", command=(lmplug_cli, "server")).start()
    try:

        async def round_trip() -> bytes:
            async with LmConnector(server.url, LmOptions()) as client:
                await client.put("sub", [memoryview(b"command")], None)
                buffer = bytearray(16)
                length = await client.get_into("sub", [memoryview(buffer)])
                return bytes(buffer[: length or 0])

        assert anyio.run(round_trip) == b"command"
    finally:
        assert server.stop() == 0
    help_text = subprocess.run([lmplug_cli, "server", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--disk-path" in help_text
