"""The dashboard in a real headless browser: after its JavaScript ran, the page lists every
instance and its tiers. Skipped when Debian's ``chromium`` is not installed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import anyio
import pytest

from lmplug_controller.protocol import TierInfo
from lmplug_controller.testing import MemoryWorker, eventually, make_keys, running_controller, running_worker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
async def test_the_dashboard_lists_the_instances_and_their_tiers(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    async with running_controller() as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        gpu = MemoryWorker(url, "prefill-0")
        nvme = MemoryWorker(url, "decode-1", tiers=(TierInfo("cpu", "cpu", 1 << 30), TierInfo("nvme", "disk", 1 << 36)))
        async with running_worker(gpu), running_worker(nvme):
            gpu.admit("cpu", make_keys("a", 5))
            nvme.admit("nvme", make_keys("b", 3))
            await eventually(lambda: controller.index.entries() == 8)
            with anyio.fail_after(60):
                result = await anyio.run_process(
                    [
                        CHROMIUM,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        f"--user-data-dir={tmp_path / 'profile'}",
                        "--dump-dom",
                        "--virtual-time-budget=4000",
                        f"{url}/",
                    ],
                    check=False,
                )
    dom = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert 'data-instance="prefill-0"' in dom
    assert 'data-instance="decode-1"' in dom
    assert re.findall(r'data-tier="(\w+)"', dom) == ["cpu", "nvme", "cpu", "disk"]
    assert "2 instances, 2 workers, 8 chunks indexed" in dom
