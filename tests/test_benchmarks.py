"""The benchmarks keep running (a --quick smoke run); their targets are reported, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.timeout(660)  # every benchmark once: about 3 minutes on 2 quiet cores
def test_benchmarks_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    names = {row["benchmark"] for row in json.loads(text)["results"]}
    assert names == {
        "cpu_throughput",
        "fixed_cost",
        "lookup_128k",
        "sync_overhead",
        "disk_throughput",
        "disk_restart",
        "remote_redis",
        "remote_s3",
        "remote_lm",
        "remote_codecs",
        "vllm_ttft",
        "p2p_transfer",
        "pd_transfer",
        "connector_copy",
        "controller_index",
        "fuzz_lm",
    }
