"""lmplug as people run it in production: vLLM's OpenAI-compatible server with the connector,
configured by ``--kv-transfer-config`` and ``LMPLUG_CONFIG``, on the real SmolLM2 model.

Two chat requests over HTTP share a long document; vLLM's own prefix cache is off, so the
second can only reuse the document's KV through lmplug, and its greedy answer is the same.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from lmplug import models
from lmplug.testing.vllm_serve import ServedEngine, start_vllm_serve, wait_healthy

LICENSE = Path("/usr/share/common-licenses/GPL-3")
START_LIMIT = 600.0  # seconds: vLLM's start-up on two busy cores


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedEngine]:
    engine = start_vllm_serve(
        "serve-test",
        models.build("smollm2"),
        tmp_path_factory.mktemp("serve"),
        served_name="smollm2",
        stack="chunk_size: 256\ntiers:\n  - type: cpu\n    capacity: 1GiB\n",
    )
    try:
        try:
            wait_healthy([engine], START_LIMIT)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield engine
    finally:
        engine.stop()


def chat(server: ServedEngine, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": "smollm2", "messages": messages, "max_tokens": 24, "temperature": 0}
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


def test_a_second_request_over_http_reuses_the_document_from_lmplug(server: ServedEngine) -> None:
    document = " ".join(LICENSE.read_text().split()[:1800])  # about 2.5k tokens of real prose
    messages = [
        {"role": "system", "content": "You answer questions about the document the user gives, in one sentence."},
        {"role": "user", "content": f"{document}\n\nQuestion: what may a user do with software under this license?"},
    ]
    first = chat(server, messages)
    before = server.statistics()["transfers"]["loaded_bytes"]
    second = chat(server, messages)
    after = server.statistics()["transfers"]["loaded_bytes"]
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > 2000
    # The second request's prefix came from lmplug: at least all whole 256-token chunks of it.
    kv_bytes_per_token = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, bfloat16
    assert after - before >= (prompt_tokens // 256) * 256 * kv_bytes_per_token
    text = first["choices"][0]["message"]["content"]
    assert len(text.split()) >= 3, first
    assert second["choices"][0]["message"]["content"] == text  # greedy: the same answer
