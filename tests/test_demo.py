"""The README's main-job command keeps working (a short run of the same program)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "every KV computed after a cached prefix matched it too" in result.stdout  # only the rest was computed
    last_round = [line for line in result.stdout.splitlines() if line.strip().startswith("3 ")]
    assert last_round, result.stdout
    assert float(last_round[0].split()[4].rstrip("%")) > 50  # the cache is at work


@pytest.mark.timeout(660)  # four vLLM processes: about 4 minutes on 2 quiet cores
def test_vllm_chat_demo_shows_the_cache_at_work(tmp_path: Path) -> None:
    """The main job itself on the random-weight model, short: four vLLM processes (alone, with
    lmplug, lmplug restarted, alone with its own cache uncapped), the answers side by side, the
    TTFT table, a plot, lmplug reusing more, and answering as vLLM's own cache does."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    pytest.importorskip("matplotlib", reason="matplotlib draws the demo's plot")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "vllm_chat.py"),
            "--model",
            "random",
            "--doc-tokens",
            "1024",
            "--turn-tokens",
            "256",
            "--questions",
            "2",
            "--users",
            "2",
            "--rounds",
            "2",
            "--reply-tokens",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "time to first token (mean)" in result.stdout
    assert "10 of 10 prompts identical token for token" in result.stdout
    # The same greedy answers as vLLM's own cache (they may part only at a bf16 tie, on the partial
    # block lmplug reuses and vLLM recomputes; none here).
    assert "10 of 10 answers identical to vLLM serving the same prefixes from its own cache" in result.stdout
    assert (tmp_path / "ttft.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "results.json").read_text())
    assert [len(data["requests"][mode]) for mode in ("vllm", "lmplug", "vllm-pc")] == [10, 10, 10]
    rows = {row["kind"]: row for row in data["rows"]}
    # The documents do not both fit vLLM's capped cache: later questions reuse far more with lmplug.
    assert rows["qa_later"]["lmplug_reused"] > 0.7 > rows["qa_later"]["vllm_reused"]
    # After the restart, the document's KV comes back from the disk tier.
    restarted = next(e for e in data["requests"]["lmplug"] if e["name"].startswith("GPL-3 Q3"))
    assert restarted["lmplug"]["disk_hits"] > 0
    assert rows["restart_qa"]["lmplug_reused"] > 0.7
