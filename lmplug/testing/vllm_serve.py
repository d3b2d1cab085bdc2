"""``vllm serve`` processes (vLLM's OpenAI-compatible server), with or without lmplug's connector,
for end-to-end tests and benchmarks.

Each runs in a session of its own (its EngineCore and worker children die with it), logs to a
file in its runtime directory, and can be asked for the connector's statistics over the lookup
channel. Needs vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmplug.testing.net import free_port

__all__ = ["ServedEngine", "healthy", "start_vllm_serve", "wait_healthy"]


@dataclass
class ServedEngine:
    """One ``vllm serve`` process."""

    name: str
    url: str
    """``http://127.0.0.1:PORT``."""
    engine_id: str | None
    """The connector's engine id (None: served without lmplug)."""
    runtime: Path
    log: Path
    process: subprocess.Popen[bytes]

    def statistics(self) -> dict[str, Any]:
        """The connector's statistics (its worker's cache, leases, transfers), over the lookup channel."""
        from lmplug.integrations.vllm.lookup import LookupClient, socket_path

        if self.engine_id is None:
            raise RuntimeError(f"{self.name} runs without lmplug")
        client = LookupClient(socket_path(self.engine_id, runtime_dir=self.runtime))
        try:
            return client.statistics()
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server and its children at once."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def start_vllm_serve(
    name: str,
    model: Path,
    work: Path,
    *,
    served_name: str,
    stack: str | None,
    cores: str | None = None,
    max_model_len: int = 4096,
    extra: Sequence[str] = (),
) -> ServedEngine:
    """Start ``vllm serve`` on ``model`` (bfloat16, eager, vLLM's own prefix cache off) in
    ``work/name``: with lmplug's connector on the YAML ``stack`` (engine id ``name``), or without
    it when ``stack`` is None; on ``cores`` (e.g. ``"0"`` or ``"0-1"``) when given: vLLM's compute
    threads (``VLLM_CPU_OMP_THREADS_BIND``) and every other thread of the server's processes
    (its API server, its engine core, lmplug's threads) run there only. vLLM's processes spin
    while they wait for one another (``shm_broadcast``'s busy loop yields but stays runnable for
    a second after each message), so two servers on one small machine must not share cores:
    a neighbour's spinning engine core halves a compute thread's time or worse. Returns at
    once: :func:`wait_healthy` waits for it."""
    runtime = work / name
    runtime.mkdir(parents=True)
    port = free_port()
    log = runtime / "vllm-serve.log"
    environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "LMPLUG_RUNTIME_DIR": str(runtime)}
    if cores is not None:
        environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", str(max_model_len),
        "--no-enable-prefix-caching", *extra,
    ]  # fmt: skip
    engine_id = None
    if stack is not None:
        config = runtime / "lmplug.yaml"
        config.write_text(stack)
        environ["LMPLUG_CONFIG"] = str(config)
        engine_id = name
        transfer = {"kv_connector": "LMPlugConnector", "kv_role": "kv_both", "engine_id": engine_id}
        command += ["--kv-transfer-config", json.dumps(transfer)]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=environ, start_new_session=True
        )  # fmt: skip
    if cores is not None:
        # Before vLLM's own processes start (its imports take seconds): they inherit it.
        os.sched_setaffinity(process.pid, _cpu_set(cores))
    return ServedEngine(name, f"http://127.0.0.1:{port}", engine_id, runtime, log, process)


def _cpu_set(cores: str) -> set[int]:
    """``"0"``, ``"0-1"``, ``"0,2-3"`` as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in cores.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def healthy(url: str) -> bool:
    """Whether ``url`` answers 200 (a server's ``/health``)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_healthy(engines: Sequence[ServedEngine], limit: float) -> None:
    """Wait until every engine answers ``/health``; :class:`RuntimeError` with the end of its log
    when one exits or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    for engine in engines:
        while not healthy(f"{engine.url}/health"):
            if engine.process.poll() is not None:
                raise RuntimeError(f"{engine.name}: vllm serve exited:\n{engine.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{engine.name}: no /health in {limit:.0f} s:\n{engine.log.read_text()[-4000:]}")
            time.sleep(1.0)  # polling a process we started
