"""Two real vLLM engines (CPU build), each with ``cpu`` + ``p2p`` tiers, and one controller process:
engine B serves a prompt with the KV engine A computed, fetched from A's memory; then A is
killed and B, told by the controller that A holds a prompt, recomputes it correctly.

Engine A stays up (``engine_run.py --hold``) while B runs; the controller's heartbeats are
slow here (30 s), so that it still lists A when B asks after A was killed: B's fetch fails
(the peer is gone) and costs a miss, never a hang or a wrong answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from agreement import compare

from lmplug.testing.vllm_model import build_model
from lmplug_controller.testing import ControllerProcess

HERE = Path(__file__).parent
CHUNK = 256
PROMPT_TOKENS = 1100


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model"), "tiny")


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    process = ControllerProcess(tmp_path_factory.mktemp("controller"), "--heartbeat", "30").start()
    try:
        yield process
    finally:
        process.stop()


def config(path: Path, controller: ControllerProcess, instance: str) -> Path:
    import yaml

    stack = [
        {"type": "cpu", "capacity": "256MiB"},
        {"type": "p2p", "controller": controller.url, "instance_id": instance, "heartbeat": 30},
    ]
    path.write_text(yaml.safe_dump({"chunk_size": CHUNK, "tiers": stack}))
    return path


def prompts(seed: int) -> list[list[int]]:
    return [[(i * 37 + seed * 11) % 7000 + 10 for i in range(PROMPT_TOKENS)]]


def engine(model: Path, out: Path, lmplug: Path, prompt_file: Path, *, hold: bool = False) -> subprocess.Popen[str]:
    """An engine process in a session of its own (vLLM's engine core and worker are its children)."""
    command = [sys.executable, str(HERE / "engine_run.py"), str(model), str(out), "--lmplug", str(lmplug)]
    command += ["--prompts", str(prompt_file), *(["--hold"] if hold else [])]
    with out.with_suffix(".log").open("w") as log:
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=log, stderr=log, text=True, start_new_session=True
        )


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL the engine and every process of its session: the worker holding the KV dies too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if process.stdin is not None:
        process.stdin.close()


def finish(process: subprocess.Popen[str], out: Path, timeout: float = 600) -> list[Any]:
    try:
        assert process.wait(timeout) == 0, out.with_suffix(".log").read_text()[-4000:]
    finally:
        kill(process)  # what vLLM left behind, if anything
    rounds: list[Any] = json.loads(out.read_text())
    return rounds


def p2p_hits(round_: dict[str, Any]) -> int:
    return sum(tier["hits"] for tier in round_["worker"]["tiers"] if tier["type"] == "p2p")


def test_an_engine_serves_a_prompt_with_kv_fetched_from_another_and_survives_its_death(
    model_dir: Path, controller: ControllerProcess, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(prompts(1)))
    second.write_text(json.dumps(prompts(2)))
    both = tmp_path / "both.json"
    both.write_text(json.dumps(prompts(1) + prompts(2)))

    a_out = tmp_path / "a.json"
    a = engine(model_dir, a_out, config(tmp_path / "a.yaml", controller, "a"), both, hold=True)
    try:
        deadline = time.monotonic() + 600
        while not a_out.exists():
            assert a.poll() is None, a_out.with_suffix(".log").read_text()[-4000:]
            assert time.monotonic() < deadline, "engine A did not finish its prompts"
            time.sleep(0.5)
        (a_round,) = json.loads(a_out.read_text())
        assert [r["cached"] for r in a_round["requests"]] == [0, 0]  # A computed both prompts itself

        # B serves the first prompt: its KV comes from A's host memory.
        b_out = tmp_path / "b.json"
        (b_round,) = finish(engine(model_dir, b_out, config(tmp_path / "b.yaml", controller, "b"), first), b_out)
        (b_request,) = b_round["requests"]
        assert b_request["cached"] == 4 * CHUNK  # whole chunks before the last token
        assert p2p_hits(b_round) == 4
        assert b_round["worker"]["transfers"]["loaded_bytes"] > 0
        agreement = compare(a_round["requests"][0], b_request)
        assert agreement.ok, agreement.mismatch
    finally:
        kill(a)

    # A is gone, but the controller (30 s heartbeats) still says it holds the second prompt:
    # C asks, fails to fetch, recomputes, and answers as A did.
    c_out = tmp_path / "c.json"
    started = time.monotonic()
    (c_round,) = finish(engine(model_dir, c_out, config(tmp_path / "c.yaml", controller, "c"), second), c_out)
    assert time.monotonic() - started < 300
    (c_request,) = c_round["requests"]
    assert c_request["cached"] == 0
    assert p2p_hits(c_round) == 0
    agreement = compare(a_round["requests"][1], c_request)
    assert agreement.ok, agreement.mismatch
