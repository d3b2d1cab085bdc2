"""The README's main-job command keeps working (a short run of the same program)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_demo_runs_and_serves_correct_kv() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "kv_demo.py"),
            "--users",
            "2",
            "--rounds",
            "3",
            "--system-tokens",
            "512",
            "--turn-tokens",
            "256",
            "--backend",
            "trio",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every retrieved KV matched a full recomputation byte for byte" in result.stdout
    last_round = [line for line in result.stdout.splitlines() if line.strip().startswith("3 ")]
    assert last_round, result.stdout
    assert float(last_round[0].split()[4].rstrip("%")) > 50  # the cache is at work
