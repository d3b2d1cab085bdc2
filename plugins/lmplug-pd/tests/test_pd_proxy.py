"""The PD proxy in this event loop (asyncio and trio) against upstream doubles of vLLM
(:mod:`pd_upstreams`): what each leg receives, what the client gets, and every failure
ending in an answer within a bound."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from lmplug_pd.params import pd_params
from lmplug_pd.proxy import Proxy, open_proxy

from pd_upstreams import Upstream, client, dead_url, fast_config, running_upstreams

COMPLETION = {"model": "m", "prompt": "hello there", "max_tokens": 20, "temperature": 0}
CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_completion_tokens": 30,
    "stream": True,
    "stream_options": {"include_usage": True},
    "min_tokens": 5,
}
XFER_ID = re.compile(r"^[0-9a-f]{32}$")


RECEIVER = "127.0.0.1:7301"
"""The decode's PD receiver as the proxy is told it (nothing listens: the doubles never push)."""


@pytest.fixture
async def one_pair() -> AsyncIterator[tuple[Proxy, Upstream, Upstream]]:
    async with (
        running_upstreams("prefill", "decode") as (prefill, decode),
        open_proxy(fast_config([prefill.url], [decode.url], receivers={decode.url: RECEIVER})) as proxy,
    ):
        yield proxy, prefill, decode


async def _eventually(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await anyio.sleep(0.01)
    raise TimeoutError("still false after 10 s")


def _metric(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_the_prefill_gets_one_token_and_the_decode_the_original_body(
    one_pair: tuple[Proxy, Upstream, Upstream],
) -> None:
    proxy, prefill, decode = one_pair
    async with client(proxy.url or "") as http:
        answer = await http.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200
    assert answer.content == decode.answer(COMPLETION)  # byte for byte
    assert answer.headers["content-type"] == "application/json"

    (to_prefill,) = prefill.received
    (to_decode,) = decode.received
    sent = to_prefill.body
    pd = sent.pop("kv_transfer_params")["lmplug"]["pd"]
    assert sent == {**COMPLETION, "max_tokens": 1, "stream": False}
    xfer_id = pd["xfer_id"]
    assert XFER_ID.match(xfer_id)
    assert pd == {"role": "prefill", "xfer_id": xfer_id, "decode": RECEIVER, "deadline_ms": 10000}
    assert to_prefill.headers["x-request-id"] == f"{xfer_id}-p"

    sent = to_decode.body
    pd = sent.pop("kv_transfer_params")["lmplug"]["pd"]
    assert sent == COMPLETION
    assert pd == {"role": "decode", "xfer_id": xfer_id, "prefill": prefill.url, "wait_ms": 10000}
    assert to_decode.headers["x-request-id"] == xfer_id
    assert to_prefill.path == to_decode.path == "/v1/completions"
    assert to_prefill.headers["authorization"] == to_decode.headers["authorization"] == "Bearer k"


async def test_a_streamed_chat_is_relayed_byte_for_byte(one_pair: tuple[Proxy, Upstream, Upstream]) -> None:
    proxy, prefill, decode = one_pair
    async with client(proxy.url or "") as http, http.stream("POST", "/v1/chat/completions", json=CHAT) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/event-stream; charset=utf-8"
        received = b"".join([chunk async for chunk in answer.aiter_raw()])
    assert received == decode.stream(CHAT)

    sent = prefill.received[0].body
    assert pd_params(sent)["role"] == "prefill"  # type: ignore[index]
    del sent["kv_transfer_params"]
    expected = {key: value for key, value in CHAT.items() if key not in ("stream_options", "min_tokens")}
    assert sent == {**expected, "max_completion_tokens": 1, "max_tokens": 1, "stream": False}
    sent = decode.received[0].body
    assert pd_params(sent)["role"] == "decode"  # type: ignore[index]
    del sent["kv_transfer_params"]
    assert sent == CHAT


async def test_a_stream_is_passed_on_as_it_arrives(one_pair: tuple[Proxy, Upstream, Upstream]) -> None:
    """The double holds its stream after the first event until the client has it: a proxy that
    waited for the whole stream would never pass it on."""
    proxy, _, decode = one_pair
    decode.release = anyio.Event()
    body = {**COMPLETION, "stream": True}
    async with client(proxy.url or "") as http, http.stream("POST", "/v1/completions", json=body) as answer:
        chunks = answer.aiter_raw()
        with anyio.fail_after(5):
            first = await chunks.__anext__()
        assert first == decode.event(body, 0)
        decode.release.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert first + rest == decode.stream(body)


async def test_the_client_keeps_its_own_kv_transfer_params(one_pair: tuple[Proxy, Upstream, Upstream]) -> None:
    proxy, prefill, decode = one_pair
    body = {**COMPLETION, "kv_transfer_params": {"other": 1, "lmplug": {"tag": "x"}}}
    async with client(proxy.url or "") as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 200
    for upstream in (prefill, decode):
        params = upstream.received[0].body["kv_transfer_params"]
        assert params["other"] == 1
        assert params["lmplug"]["tag"] == "x"
        assert set(params["lmplug"]["pd"]) >= {"role", "xfer_id"}


async def test_requests_go_round_robin_over_two_prefills_and_two_decodes() -> None:
    async with running_upstreams("p0", "p1", "d0", "d1") as upstreams:
        p0, p1, d0, d1 = upstreams
        async with (
            open_proxy(fast_config([p0.url, p1.url], [d0.url, d1.url])) as proxy,
            client(proxy.url or "") as http,
        ):
            for number in range(4):
                answer = await http.post("/v1/completions", json={**COMPLETION, "prompt": f"q{number}"})
                assert answer.json()["choices"][0]["text"] == f"d{number % 2} answers q{number}"
    for prefill, decode, prompts in ((p0, d0, ["q0", "q2"]), (p1, d1, ["q1", "q3"])):
        assert [received.body["prompt"] for received in prefill.received] == prompts
        assert [received.body["prompt"] for received in decode.received] == prompts
        for received in decode.received:  # each decode was told which prefill pushes to it
            assert pd_params(received.body)["prefill"] == prefill.url  # type: ignore[index]
        for received in prefill.received:  # no receiver given: the decode is told not to wait
            assert pd_params(received.body)["decode"] == decode.url  # type: ignore[index]
        assert [pd_params(received.body)["wait_ms"] for received in decode.received] == [0, 0]  # type: ignore[index]


async def test_the_prefill_pushes_to_the_decodes_receiver_and_the_decode_waits_for_it() -> None:
    async with running_upstreams("p0", "d0") as (p0, d0):
        config = fast_config([p0.url], [d0.url], receivers={d0.url: "127.0.0.1:7301"}, decode_wait=3.0)
        async with open_proxy(config) as proxy, client(proxy.url or "") as http:
            answer = await http.post("/v1/completions", json={**COMPLETION, "prompt": "q"})
            assert answer.status_code == 200
    prefill = pd_params(p0.received[0].body)
    decode = pd_params(d0.received[0].body)
    assert prefill is not None
    assert decode is not None
    assert (prefill["role"], prefill["decode"]) == ("prefill", "127.0.0.1:7301")
    assert (decode["role"], decode["wait_ms"], decode["xfer_id"]) == ("decode", 3000, prefill["xfer_id"])


async def test_a_prefill_that_is_down_costs_only_a_full_prefill_on_the_decode() -> None:
    async with running_upstreams("decode") as (decode,):
        gone = dead_url()
        async with open_proxy(fast_config([gone], [decode.url])) as proxy:
            async with client(proxy.url or "") as http:
                raw = json.dumps(COMPLETION).encode()
                answer = await http.post("/v1/completions", content=raw)
            assert answer.status_code == 200
            assert answer.content == decode.answer(COMPLETION)
            assert decode.received[0].raw == raw  # the client's body itself: no PD parameters
            assert _metric(proxy, "lmplug_pd_proxy_fallbacks_total", prefill=gone, reason="connect") == 1
            assert _metric(
                proxy, "lmplug_pd_proxy_upstream_errors_total", instance=gone, role="prefill", kind="connect"
            )


@pytest.mark.parametrize("failure", ["status", "timeout"])
async def test_a_prefill_that_fails_or_hangs_falls_back_within_its_timeout(failure: str) -> None:
    async with running_upstreams("prefill", "decode") as (prefill, decode):
        prefill.status, prefill.hang = (500, False) if failure == "status" else (200, True)
        async with open_proxy(fast_config([prefill.url], [decode.url], prefill_timeout=0.5)) as proxy:
            started = time.monotonic()
            async with client(proxy.url or "") as http:
                answer = await http.post("/v1/completions", json={**COMPLETION, "stream": True})
            assert time.monotonic() - started < 5
            assert answer.status_code == 200
            assert answer.content == decode.stream({**COMPLETION, "stream": True})
            assert "kv_transfer_params" not in decode.received[0].body
            assert _metric(proxy, "lmplug_pd_proxy_fallbacks_total", prefill=prefill.url, reason=failure) == 1


async def test_a_decode_that_is_down_is_a_502_naming_it() -> None:
    async with running_upstreams("prefill") as (prefill,):
        gone = dead_url()
        async with open_proxy(fast_config([prefill.url], [gone])) as proxy:
            async with client(proxy.url or "") as http:
                answer = await http.post("/v1/completions", json=COMPLETION)
            assert answer.status_code == 502
            error = answer.json()["error"]
            assert gone in error["message"]
            assert "unreachable" in error["message"]
            assert error["type"] == "upstream_error"
            assert _metric(proxy, "lmplug_pd_proxy_upstream_errors_total", instance=gone, role="decode", kind="connect")
            assert _metric(proxy, "lmplug_pd_proxy_requests_total", route="completions", status="502") == 1
            assert proxy.health()["in_flight"] == 0


async def test_a_decode_that_never_answers_is_a_502_after_its_timeout() -> None:
    async with running_upstreams("prefill", "decode") as (prefill, decode):
        decode.hang = True
        async with open_proxy(fast_config([prefill.url], [decode.url], decode_timeout=0.5)) as proxy:
            started = time.monotonic()
            async with client(proxy.url or "") as http:
                answer = await http.post("/v1/completions", json=COMPLETION)
            assert time.monotonic() - started < 5
            assert answer.status_code == 502
            assert f"decode instance {decode.url} was silent for 0.5 s" in answer.json()["error"]["message"]
            assert _metric(
                proxy, "lmplug_pd_proxy_upstream_errors_total", instance=decode.url, role="decode", kind="timeout"
            )


@pytest.mark.parametrize("partial", [False, True], ids=["between-events", "inside-an-event"])
async def test_a_decode_killed_mid_stream_ends_the_stream_with_an_error_event(
    one_pair: tuple[Proxy, Upstream, Upstream], partial: bool
) -> None:
    proxy, _, decode = one_pair
    decode.die_after, decode.partial = 2, partial
    body = {**COMPLETION, "stream": True}
    with anyio.fail_after(10):
        async with client(proxy.url or "") as http, http.stream("POST", "/v1/completions", json=body) as answer:
            assert answer.status_code == 200
            received = b"".join([chunk async for chunk in answer.aiter_raw()])
    events = received.split(b"\n\n")
    assert received.startswith(decode.event(body, 0) + decode.event(body, 1))
    error_event = events[2]  # half an event never reaches the client
    assert error_event.startswith(b"event: error\ndata: ")
    error = json.loads(error_event.split(b"data: ", 1)[1])["error"]
    assert decode.url in error["message"]
    assert error["code"] == 502
    assert events[3:] == [b""]  # nothing after it
    assert _metric(proxy, "lmplug_pd_proxy_upstream_errors_total", instance=decode.url, role="decode", kind="broken")
    assert proxy.health()["in_flight"] == 0


async def test_a_decode_killed_mid_answer_cuts_the_answer_short(one_pair: tuple[Proxy, Upstream, Upstream]) -> None:
    proxy, _, decode = one_pair
    decode.die_after = 0
    with anyio.fail_after(10):
        async with client(proxy.url or "") as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post("/v1/completions", json=COMPLETION)
    assert _metric(proxy, "lmplug_pd_proxy_upstream_errors_total", instance=decode.url, role="decode", kind="broken")


async def test_a_decode_that_stalls_mid_stream_ends_it_after_its_timeout() -> None:
    async with running_upstreams("prefill", "decode") as (prefill, decode):
        decode.stall_after = 1
        async with open_proxy(fast_config([prefill.url], [decode.url], decode_timeout=0.5)) as proxy:
            body = {**COMPLETION, "stream": True}
            with anyio.fail_after(5):
                async with client(proxy.url or "") as http:
                    answer = await http.post("/v1/completions", json=body)
            first, error, end = answer.content.split(b"\n\n")
            assert first + b"\n\n" == decode.event(body, 0)
            assert b"was silent for 0.5 s in the middle of its answer" in error
            assert end == b""


async def test_a_client_that_goes_away_mid_stream_closes_the_decode_stream(
    one_pair: tuple[Proxy, Upstream, Upstream],
) -> None:
    """A raw socket is the client: it reads the first event and hangs up."""
    proxy, _, decode = one_pair
    decode.events = 10_000
    host, port = (proxy.url or "").removeprefix("http://").split(":")
    payload = json.dumps({**COMPLETION, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(payload)}\r\n\r\n"
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(head.encode() + payload)
        received = b""
        while b"\n\n" not in received.partition(b"\r\n\r\n")[2]:
            received += await stream.receive()
    with anyio.fail_after(10):
        await decode.disconnected.wait()
        await _eventually(lambda: proxy.health()["in_flight"] == 0)


@pytest.mark.parametrize("status", [400, 422])
async def test_an_upstream_client_error_is_relayed_as_it_is(
    one_pair: tuple[Proxy, Upstream, Upstream], status: int
) -> None:
    proxy, prefill, decode = one_pair
    prefill.status = decode.status = status
    async with client(proxy.url or "") as http:
        answer = await http.post("/v1/completions", json=COMPLETION)
    assert answer.status_code == status
    assert answer.json() == {
        "object": "error",
        "message": f"decode refuses with {status}",
        "type": "BadRequestError",
        "code": status,
    }


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "words"),
    [
        ("POST", "/v1/completions", b"{not json", 400, "not JSON"),
        ("POST", "/v1/completions", b"", 400, "not JSON"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/completions", b'{"prompt": "x", "kv_transfer_params": [1]}', 400, "kv_transfer_params"),
        ("GET", "/v1/completions", b"", 405, "takes POST"),
        ("POST", "/health", b"{}", 405, "takes GET"),
        ("GET", "/v1/embeddings", b"", 404, "no such endpoint"),
        ("POST", "/v1/completions", b'{"prompt": "' + b"x" * 2000 + b'"}', 413, "longer than 1000 bytes"),
    ],
)
async def test_bad_requests_get_json_errors_and_reach_no_instance(
    method: str, path: str, content: bytes, status: int, words: str
) -> None:
    async with (
        running_upstreams("prefill", "decode") as (prefill, decode),
        open_proxy(fast_config([prefill.url], [decode.url], max_body=1000)) as proxy,
        client(proxy.url or "") as http,
    ):
        answer = await http.request(method, path, content=content)
        assert answer.status_code == status
        error = answer.json()["error"]
        assert words in error["message"]
        assert error["code"] == status
        assert (await http.get("/health")).status_code == 200  # the proxy serves on
    assert prefill.received == decode.received == []


async def test_health_lists_the_instances_and_metrics_count_the_legs() -> None:
    async with running_upstreams("p0", "p1", "d0") as (p0, p1, d0):
        p1.status = 503
        async with open_proxy(fast_config([p0.url, p1.url], [d0.url])) as proxy, client(proxy.url or "") as http:
            health = (await http.get("/health")).json()
            assert health == {"ok": True, "prefill": [p0.url, p1.url], "decode": [d0.url], "in_flight": 0}
            assert (await http.get("/healthz")).json() == health
            for _ in range(2):
                assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (await http.get("/v1/models")).json() == {"data": [{"id": "m"}]}
            metrics = await http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'lmplug_pd_proxy_requests_total{route="completions",status="200"} 2.0' in text
    assert 'lmplug_pd_proxy_requests_total{route="chat_completions",status="200"} 1.0' in text
    assert f'lmplug_pd_proxy_fallbacks_total{{prefill="{p1.url}",reason="status"}} 1.0' in text
    assert f'lmplug_pd_proxy_upstream_errors_total{{instance="{p1.url}",kind="status",role="prefill"}} 1.0' in text
    assert f'lmplug_pd_proxy_prefill_seconds_count{{instance="{p0.url}"}} 2.0' in text
    assert f'lmplug_pd_proxy_prefill_seconds_count{{instance="{p1.url}"}} 1.0' in text
    assert f'lmplug_pd_proxy_decode_seconds_count{{instance="{d0.url}"}} 3.0' in text
    assert "lmplug_pd_proxy_in_flight 0.0" in text


async def test_twenty_requests_at_once_are_all_answered() -> None:
    async with running_upstreams("p0", "p1", "d0", "d1") as upstreams:
        p0, p1, d0, d1 = upstreams
        answers: dict[int, bytes] = {}
        async with open_proxy(fast_config([p0.url, p1.url], [d0.url, d1.url])) as proxy:
            async with client(proxy.url or "") as http:

                async def ask(number: int) -> None:
                    body: dict[str, Any] = {**COMPLETION, "prompt": f"q{number}", "stream": number % 2 == 0}
                    answer = await http.post("/v1/completions", json=body)
                    assert answer.status_code == 200
                    answers[number] = answer.content

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as group:
                        for number in range(20):
                            group.start_soon(ask, number)
            assert proxy.health()["in_flight"] == 0
    assert len(answers) == 20
    for number, content in answers.items():
        body = {**COMPLETION, "prompt": f"q{number}", "stream": number % 2 == 0}
        assert content in (d0.stream(body), d1.stream(body)) if body["stream"] else (d0.answer(body), d1.answer(body))
    assert len(d0.received) == len(d1.received) == len(p0.received) == len(p1.received) == 10


async def test_shutdown_lets_a_stream_in_flight_finish_and_refuses_new_connections() -> None:
    async with running_upstreams("prefill", "decode") as (prefill, decode):
        decode.release = anyio.Event()
        body = {**COMPLETION, "stream": True}
        async with open_proxy(fast_config([prefill.url], [decode.url])) as proxy:
            url = proxy.url or ""
            async with client(url) as http, http.stream("POST", "/v1/completions", json=body) as answer:
                chunks = answer.aiter_raw()
                first = await chunks.__anext__()
                proxy.shutdown()
                await anyio.sleep(0.1)
                async with client(url) as other:
                    with pytest.raises(httpx.ConnectError):
                        await other.get("/health")
                decode.release.set()
                rest = b"".join([chunk async for chunk in chunks])
            assert first + rest == decode.stream(body)
