"""lmplug as people run it in production: vLLM's OpenAI-compatible server with the connector,
configured by ``--kv-transfer-config`` and ``LMPLUG_CONFIG``, on the real SmolLM2 model.

Two chat requests over HTTP share a long document; vLLM's own prefix cache is off, so the
second can only reuse the document's KV through lmplug, and its greedy answer is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from lmplug import models
from lmplug.integrations.vllm.lookup import LookupClient, socket_path
from lmplug.testing import free_port

ENGINE_ID = "serve-test"
LICENSE = Path("/usr/share/common-licenses/GPL-3")
START_LIMIT = 600.0  # seconds: vLLM's start-up on two busy cores


@dataclass(frozen=True)
class Server:
    url: str
    runtime: Path
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = models.build("smollm2")
    work = tmp_path_factory.mktemp("serve")
    config = work / "lmplug.yaml"
    config.write_text("chunk_size: 256\ntiers:\n  - type: cpu\n    capacity: 1GiB\n")
    port = free_port()
    log = work / "vllm-serve.log"
    environ = {
        **os.environ,
        "LMPLUG_CONFIG": str(config),
        "LMPLUG_RUNTIME_DIR": str(work),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    transfer = {"kv_connector": "LMPlugConnector", "kv_role": "kv_both", "engine_id": ENGINE_ID}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "4096", "--no-enable-prefix-caching",
        "--kv-transfer-config", json.dumps(transfer),
    ]  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer /health in {START_LIMIT:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(1.0)  # polling a process we started, not synchronising with our own code
        yield Server(url, work, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def chat(server: Server, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": "smollm2", "messages": messages, "max_tokens": 24, "temperature": 0}
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


def statistics(server: Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("LMPLUG_RUNTIME_DIR", str(server.runtime))
    client = LookupClient(socket_path(ENGINE_ID))
    try:
        return client.statistics()
    finally:
        client.close()


def test_a_second_request_over_http_reuses_the_document_from_lmplug(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = " ".join(LICENSE.read_text().split()[:1800])  # about 2.5k tokens of real prose
    messages = [
        {"role": "system", "content": "You answer questions about the document the user gives, in one sentence."},
        {"role": "user", "content": f"{document}\n\nQuestion: what may a user do with software under this license?"},
    ]
    first = chat(server, messages)
    before = statistics(server, monkeypatch)["transfers"]["loaded_bytes"]
    second = chat(server, messages)
    after = statistics(server, monkeypatch)["transfers"]["loaded_bytes"]
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > 2000
    # The second request's prefix came from lmplug: at least all whole 256-token chunks of it.
    kv_bytes_per_token = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, bfloat16
    assert after - before >= (prompt_tokens // 256) * 256 * kv_bytes_per_token
    text = first["choices"][0]["message"]["content"]
    assert len(text.split()) >= 3, first
    assert second["choices"][0]["message"]["content"] == text  # greedy: the same answer
