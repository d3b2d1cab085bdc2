"""``lmplug-controller`` as a process: ready line, clean exit on SIGTERM, a kill and a restart
on the same port that workers of another process survive."""

from __future__ import annotations

import signal
import subprocess
import sys

import anyio

from lmplug_controller.testing import MemoryWorker, eventually, http_json, make_keys, running_worker

KEYS = make_keys("prompt", 6)


async def test_sigterm_stops_the_controller_cleanly(controller_processes) -> None:  # type: ignore[no-untyped-def]
    controller = controller_processes("--heartbeat", "0.1")
    assert (await http_json(controller.url, "GET", "/healthz"))[0] == 200
    assert controller.stop(signal.SIGTERM) == 0
    assert "stopping" in controller.log_path.read_text()


async def test_workers_survive_a_killed_and_restarted_controller(controller_processes) -> None:  # type: ignore[no-untyped-def]
    controller = controller_processes("--heartbeat", "0.1", "--missed-heartbeats", "10")
    worker = MemoryWorker(controller.url, "a")
    async with running_worker(worker):
        worker.admit("cpu", KEYS)
        body = {"keys": [key.hex() for key in KEYS]}

        async def wait_indexed() -> None:
            for _ in range(200):
                status, answer = await http_json(controller.url, "POST", "/v1/lookup", body)
                if status == 200 and answer["holders"] and answer["holders"][0]["chunks"] == len(KEYS):
                    return
                await anyio.sleep(0.05)
            raise TimeoutError("the keys were not indexed")

        await wait_indexed()
        controller.kill()
        assert await worker.client.lookup(KEYS) == []
        await anyio.to_thread.run_sync(controller.start)  # the same HTTP port, a new ZeroMQ port
        await eventually(lambda: worker.client.statistics()["reconnects"] == 1, within=10)
        await wait_indexed()


def test_the_cli_refuses_bad_values() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmplug_controller", "--port", "0", "--heartbeat", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "heartbeat_seconds" in result.stderr
