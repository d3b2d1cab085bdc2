"""Prefill/decode disaggregation end to end: two ``vllm serve`` processes and ``lmplug-pd-proxy``.

The prefill instance (P) computes each prompt and pushes its KV to the decode instance (D)
through the ``pd`` tier of their lmplug stacks; D loads it and generates. Each instance
computes on a core of its own (``VLLM_CPU_OMP_THREADS_BIND``), vLLM's own prefix cache is off
on both (each server's processes pinned to its core), and the model is SmolLM2 (real weights:
far fewer near-ties than the random-weight test models'; where one remains, two correct runs
may part there, see :data:`NEAR_TIE`).

The reference for every prompt is P itself, asked directly, before any PD traffic: vLLM
computing the whole prompt (a miss leaves vLLM's compute untouched, see test_vllm_e2e). Then
the failure cases, each real: a transfer too large for D's receive budget (D computes the
prompt at once), P killed in the middle of a push (D loads the verified prefix and computes
the rest), then D gone (the proxy answers 502).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("lmplug_pd", reason="lmplug-pd is not installed")

from lmplug import models
from lmplug.testing import free_port
from lmplug.testing.vllm_serve import ServedEngine, healthy, start_vllm_serve, wait_healthy

LICENSE = Path("/usr/share/common-licenses/GPL-3")
START_LIMIT = 600.0  # seconds: two vLLMs starting at once on two busy cores
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # SmolLM2: K and V, 30 layers, 3 KV heads of 64, bfloat16
CHUNK_DELAY = 0.4  # seconds P's sender waits before each chunk in the kill test (a slow link)
RECEIVE_BUDGET = "96MiB"  # D's max_inflight: a 3.9k-token prompt's KV fits (90 MB), a 4.5k one's does not


@dataclass
class Fleet:
    prefill: ServedEngine
    decode: ServedEngine
    proxy: str
    receiver: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    model = models.build("smollm2")
    work = tmp_path_factory.mktemp("pd")
    receiver = f"127.0.0.1:{free_port()}"
    common = "chunk_size: 256\nsave_partial_chunks: true\ntiers:\n  - {type: cpu, capacity: 1GiB}\n"
    prefill = start_vllm_serve(
        "prefill", model, work, cores="0", stack=common + f"  - {{type: pd, debug_chunk_delay: {CHUNK_DELAY}s}}\n",
        served_name="smollm2", max_model_len=4608,
    )  # fmt: skip
    receive = f"  - {{type: pd, port: {receiver.rsplit(':', 1)[1]}, max_inflight: {RECEIVE_BUDGET}}}\n"
    decode = start_vllm_serve(
        "decode", model, work, cores="1", stack=common + receive,
        served_name="smollm2", max_model_len=4608,
    )  # fmt: skip
    proxy_port = free_port()
    proxy_log = (work / "proxy.log").open("w")
    proxy = subprocess.Popen(
        [
            sys.executable, "-c", "import sys; from lmplug_pd.cli import main; sys.exit(main())",
            "--prefill", prefill.url, "--decode", f"{decode.url}={receiver}", "--port", str(proxy_port),
            "--decode-wait", "20", "--push-deadline", "30",
        ],
        stdout=proxy_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    try:
        try:
            wait_healthy([prefill, decode], START_LIMIT)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        while not healthy(f"{proxy_url}/health"):
            assert proxy.poll() is None, (work / "proxy.log").read_text()
            time.sleep(0.2)
        yield Fleet(prefill, decode, proxy_url, receiver)
    finally:
        if proxy.poll() is None:
            os.killpg(proxy.pid, signal.SIGTERM)
        for engine in (prefill, decode):
            engine.stop()
        proxy.wait(timeout=60)
        proxy_log.close()


def post(url: str, path: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


def stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed answer (server-sent events), parsed."""
    request = urllib.request.Request(
        f"{url}{path}", json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
    events = []
    with urllib.request.urlopen(request, timeout=600) as reply:
        for line in reply:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


@dataclass(frozen=True)
class Generation:
    """A greedy answer as tokens (their text) and each step's top logprobs (by token text)."""

    tokens: list[str]
    top: list[dict[str, float]]

    @classmethod
    def of(cls, answer: dict[str, Any] | list[dict[str, Any]]) -> Generation:
        """From a completion or chat answer, whole (JSON) or streamed (its events)."""
        choices = [event["choices"][0] for event in answer] if isinstance(answer, list) else [answer["choices"][0]]
        tokens: list[str] = []
        top: list[dict[str, float]] = []
        for choice in choices:
            logprobs = choice.get("logprobs")
            if not logprobs:
                continue
            if "content" in logprobs:  # chat: a list of {token, logprob, top_logprobs: [{token, logprob}]}
                for step in logprobs["content"]:
                    tokens.append(step["token"])
                    top.append({entry["token"]: entry["logprob"] for entry in step["top_logprobs"]})
            else:  # completions: parallel lists
                tokens.extend(logprobs["tokens"])
                top.extend(logprobs["top_logprobs"])
        return cls(tokens, top)


NEAR_TIE = 0.5
"""How far below the reference's choice another token may be and still be chosen by a correct
run. SmolLM2's logits come out of a bfloat16 ``lm_head`` at magnitudes where bfloat16 values lie
0.125-0.25 apart; a prefill of the last token over loaded KV rounds differently from a whole
prefill (measured on one instance: ``<|im_end|>`` at -1.97 in a whole prefill, -2.22 over its own
cached KV), which moves a logprob by a spacing or two. Where two tokens are that close, either
is a correct greedy choice, and the answers may part there."""


def agreement(reference: Generation, candidate: Generation) -> str | None:
    """None when ``candidate`` is the greedy answer ``reference`` is, but for parting at a near-tie
    (the tokens agree up to a step where the candidate's choice is within :data:`NEAR_TIE` of the
    reference's, and every logprob both list until then is within it too); else what differs."""
    if not reference.tokens or len(reference.tokens) != len(candidate.tokens):
        return f"{len(reference.tokens)} reference tokens vs {len(candidate.tokens)}"
    for step, (expected, got) in enumerate(zip(reference.tokens, candidate.tokens, strict=True)):
        for token in reference.top[step].keys() & candidate.top[step].keys():
            moved = abs(reference.top[step][token] - candidate.top[step][token])
            if moved > NEAR_TIE:  # wrong KV moves logprobs further (and the greedy tokens with them)
                return f"step {step}: the logprob of {token!r} moved by {moved:.3f}"
        if expected != got:
            top = reference.top[step]
            gap = top[expected] - top.get(got, min(top.values()) - 1.0)
            if gap <= NEAR_TIE:
                return None  # a near-tie: both continuations are correct greedy answers
            return f"step {step}: {got!r} instead of {expected!r}, {gap:.3f} below it in the reference"
    return None


def prompt_of(start: int, words: int, question: str) -> str:
    """A prompt over ``words`` words of the license from word ``start``: prompts that start at
    different words share no chunk (keys chain over every token before them), so each one's KV
    must come whole from its own push."""
    document = " ".join(LICENSE.read_text().split()[start : start + words])
    return f"Read this document.\n\n{document}\n\nQuestion: {question}\nAnswer:"


PROMPTS = [
    prompt_of(0, 600, "who may copy this license?"),
    prompt_of(700, 1700, "what must a distributor of modified versions do?"),
    prompt_of(2500, 3000, "what does the license say about patents?"),
]


def completion(prompt: str) -> dict[str, Any]:
    return {"model": "smollm2", "prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 5}


def pd_status(answer: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = answer["kv_transfer_params"]["lmplug"]["pd"]
    return params


def test_pd_answers_equal_one_instance_and_the_decode_loads_the_prompt(fleet: Fleet) -> None:
    references = [post(fleet.prefill.url, "/v1/completions", completion(prompt)) for prompt in PROMPTS]
    tokens = [reference["usage"]["prompt_tokens"] for reference in references]
    assert 700 < tokens[0] < 1200 < tokens[1] < 2600 < tokens[2] < 4300, tokens
    for prompt, reference, length in zip(PROMPTS, references, tokens, strict=True):
        before = fleet.decode.statistics()["transfers"]["loaded_bytes"]
        answer = post(fleet.proxy, "/v1/completions", completion(prompt))
        loaded = fleet.decode.statistics()["transfers"]["loaded_bytes"] - before
        assert agreement(Generation.of(reference), Generation.of(answer)) is None, (reference, answer)
        # D computed only the last prompt token: every other one came from P's push.
        status = pd_status(answer)
        assert (status["status"], status["loaded_tokens"]) == ("loaded", length - 1)
        assert loaded == (length - 1) * KV_BYTES_PER_TOKEN
    pushed = fleet.prefill.statistics()["transfers"]
    assert pushed["pushes"] == 3
    assert pushed["short_pushes"] == 0
    assert pushed["pushed_tokens"] == sum(tokens) - 3


def test_a_streamed_answer_through_the_proxy_equals_one_instance(fleet: Fleet) -> None:
    prompt = prompt_of(100, 1200, "may one charge a fee for a copy?")
    reference = post(fleet.prefill.url, "/v1/completions", completion(prompt))
    before = fleet.decode.statistics()["transfers"]["loaded_bytes"]
    events = stream(fleet.proxy, "/v1/completions", completion(prompt))
    assert agreement(Generation.of(reference), Generation.of(events)) is None, (reference, events)
    text = "".join(event["choices"][0]["text"] for event in events)
    assert text == "".join(Generation.of(events).tokens)  # the events carry the whole answer
    length = reference["usage"]["prompt_tokens"]
    assert fleet.decode.statistics()["transfers"]["loaded_bytes"] - before == (length - 1) * KV_BYTES_PER_TOKEN


def test_chat_through_the_proxy_equals_one_instance(fleet: Fleet) -> None:
    document = " ".join(LICENSE.read_text().split()[200:1100])
    body = {
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You answer questions about the document, in one sentence."},
            {"role": "user", "content": f"{document}\n\nQuestion: what is the license's name?"},
        ],
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    reference = post(fleet.prefill.url, "/v1/chat/completions", body)
    answer = post(fleet.proxy, "/v1/chat/completions", body)
    assert agreement(Generation.of(reference), Generation.of(answer)) is None, (reference, answer)
    assert pd_status(answer)["status"] == "loaded"


def test_concurrent_requests_all_complete_with_their_kv(fleet: Fleet) -> None:
    """Six requests at once through the proxy: no deadlock between pushes, receives and waits;
    each answer agrees with one instance and loaded its whole prompt but the last token."""
    prompts = [prompt_of(3300 + 300 * index, 500, "is there a warranty?") for index in range(6)]
    references = [post(fleet.prefill.url, "/v1/completions", completion(prompt)) for prompt in prompts]
    answers: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def ask(index: int) -> None:
        try:
            answers[index] = post(fleet.proxy, "/v1/completions", completion(prompts[index]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    for index, reference in enumerate(references):
        answer = answers[index]
        assert agreement(Generation.of(reference), Generation.of(answer)) is None, (reference, answer)
        status = pd_status(answer)
        assert (status["status"], status["loaded_tokens"]) == ("loaded", reference["usage"]["prompt_tokens"] - 1)
    leases = fleet.decode.statistics()["leases"]
    assert leases == 0  # every lookup's lease went with its request


def test_a_push_too_large_for_the_decodes_buffer_is_a_prompt_the_decode_computes(fleet: Fleet) -> None:
    """D's receiver refuses a transfer larger than its whole budget; D's scheduler learns it from
    the receiver and computes the prompt at once (it does not wait out ``--decode-wait``, 20 s)."""
    text = " ".join(LICENSE.read_text().split()[:4000])
    ids = post(fleet.prefill.url, "/tokenize", {"model": "smollm2", "prompt": text})["tokens"][:4500]
    assert 4500 * KV_BYTES_PER_TOKEN > 96 << 20
    reference = post(fleet.prefill.url, "/v1/completions", {**completion(""), "prompt": ids})
    started = time.monotonic()
    answer = post(fleet.proxy, "/v1/completions", {**completion(""), "prompt": ids})
    assert time.monotonic() - started < 20  # no waiting for KV that will not come
    assert agreement(Generation.of(reference), Generation.of(answer)) is None, (reference, answer)
    assert pd_status(answer) | {"xfer_id": None} == {"xfer_id": None, "status": "recomputed", "loaded_tokens": 0}


def test_a_prefill_killed_mid_push_costs_the_decode_only_the_rest(fleet: Fleet) -> None:
    """P is killed while its (slowed) push is under way: D's receiver marks the transfer failed,
    and D loads the verified prefix it kept and computes the rest; the answer is still right."""
    prompt = prompt_of(1300, 2800, "what happens when the license is violated?")
    reference = post(fleet.prefill.url, "/v1/completions", completion(prompt))
    length = reference["usage"]["prompt_tokens"]
    chunks_before = _chunks(fleet.decode)
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            answers.append(post(fleet.proxy, "/v1/completions", completion(prompt)))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 120
    while _chunks(fleet.decode) < chunks_before + 2:  # two chunks of the push have arrived
        assert time.monotonic() < deadline, "the push never reached the decode instance"
        time.sleep(0.05)
    fleet.prefill.kill()
    asking.join(timeout=300)
    assert not asking.is_alive()
    assert errors == []
    (answer,) = answers
    assert agreement(Generation.of(reference), Generation.of(answer)) is None, (reference, answer)
    status = pd_status(answer)
    assert status["status"] == "partial", status
    assert 2 * 256 <= status["loaded_tokens"] < length - 1


def test_a_dead_decode_is_a_502_from_the_proxy(fleet: Fleet) -> None:
    fleet.decode.kill()
    request = urllib.request.Request(
        f"{fleet.proxy}/v1/completions", json.dumps(completion("Hello")).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=120)
    assert caught.value.code == 502
    error = json.loads(caught.value.read())["error"]
    assert "decode instance" in error["message"]
    assert error["code"] == 502


def _chunks(instance: ServedEngine) -> int:
    tiers = instance.statistics()["tiers"]
    return sum(tier["chunks"] for tier in tiers if tier["type"] == "cpu")
