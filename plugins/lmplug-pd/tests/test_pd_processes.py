"""``lmplug pd-proxy`` as a process, as an operator starts it: the ready line, ``/health``, a
request through it to upstream doubles (:mod:`pd_upstreams`) in this event loop, and a clean exit
on SIGTERM and SIGINT. The proxy runs on the same event loop as the test (asyncio or trio)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import Process

from lmplug_pd.cli import BACKEND_ENV

from pd_upstreams import Upstream, client, running_upstreams

BIN = Path(sys.executable).parent
PROMPT = {"model": "m", "prompt": "through a process", "max_tokens": 4}


@contextlib.asynccontextmanager
async def proxy_process(
    backend: str, log: Path, prefill: Upstream, decode: Upstream, *options: str
) -> AsyncIterator[tuple[Process, str]]:
    """``lmplug pd-proxy`` on a free port in front of ``prefill`` and ``decode``: the process and its URL."""
    command = [str(BIN / "lmplug"), "pd-proxy", "--prefill", prefill.url, "--decode", decode.url, "--port", "0"]
    with log.open("w") as output:
        process = await anyio.open_process(
            [*command, *options], stdout=subprocess.PIPE, stderr=output, env={**os.environ, BACKEND_ENV: backend}
        )
    async with process:
        try:
            assert process.stdout is not None
            line = b""
            with anyio.fail_after(60):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive()
            text = line.decode()
            assert text.startswith("lmplug-pd-proxy ready on http://127.0.0.1:"), text
            assert f"(prefill: {prefill.url}; decode: {decode.url})" in text
            yield process, text.split()[3]
        finally:
            if process.returncode is None:
                process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_lmplug_pd_proxy_serves_and_stops_on_a_signal(
    anyio_backend: str, signum: signal.Signals, tmp_path: Path
) -> None:
    log = tmp_path / "proxy.log"
    async with (
        running_upstreams("prefill", "decode") as (prefill, decode),
        proxy_process(anyio_backend, log, prefill, decode) as (process, url),
    ):
        async with client(url) as http:
            health = (await http.get("/health")).json()
            assert health == {"ok": True, "prefill": [prefill.url], "decode": [decode.url], "in_flight": 0}
            answer = await http.post("/v1/completions", json=PROMPT)
        assert answer.content == decode.answer(PROMPT)
        assert len(prefill.received) == len(decode.received) == 1
        process.send_signal(signum)
        with anyio.fail_after(30):
            assert await process.wait() == 0
    assert f"{signum.name}, stopping" in log.read_text()


async def test_a_second_signal_stops_the_proxy_while_a_stream_is_in_flight(anyio_backend: str, tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    async with (
        running_upstreams("prefill", "decode") as (prefill, decode),
        proxy_process(anyio_backend, log, prefill, decode, "--drain-timeout", "120") as (process, url),
    ):
        decode.release = anyio.Event()  # the stream stops after its first event
        async with (
            client(url) as http,
            http.stream("POST", "/v1/completions", json={**PROMPT, "stream": True}) as answer,
        ):
            chunks = answer.aiter_raw()
            await chunks.__anext__()
            process.send_signal(signal.SIGTERM)
            await anyio.sleep(0.5)
            assert process.returncode is None  # draining: the stream may finish
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):  # not the 120 s of the drain
                assert await process.wait() == 0
            with pytest.raises(httpx.RemoteProtocolError):  # cut short
                async for _ in chunks:
                    pass
        decode.release.set()
    assert "SIGTERM again, stopping now" in log.read_text()


def test_the_command_refuses_bad_instances_and_values() -> None:
    for arguments, words in (
        (["--prefill", "ftp://x", "--decode", "http://127.0.0.1:1"], "http://HOST:PORT URL"),
        (["--prefill", "http://a:1/v1", "--decode", "http://127.0.0.1:1"], "no path"),
        (["--prefill", "http://a:1", "--decode", "http://b:1", "--prefill-timeout", "0"], "prefill_timeout"),
    ):
        done = subprocess.run(
            [str(BIN / "lmplug-pd-proxy"), *arguments], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, done.stderr
        assert words in done.stderr
