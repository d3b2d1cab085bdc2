"""Tensor parallelism 2 on real vLLM (CPU build): each rank stores and loads its own shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from lmplug.testing.vllm_model import SIZES, build_model

HERE = Path(__file__).parent
CHUNK = 256


VLLM_CPU_BLOCK = 128


def test_each_rank_caches_and_loads_its_own_shard(tmp_path: Path) -> None:
    model = build_model(tmp_path / "model", "tiny")
    config = tmp_path / "lmplug.yaml"
    config.write_text(f"chunk_size: {CHUNK}\ntiers:\n  - type: cpu\n    capacity: 256MiB\n")
    out = tmp_path / "tp.json"
    result = subprocess.run(
        [sys.executable, str(HERE / "engine_tp.py"), str(model), str(config), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    first, second = report["rounds"]
    assert first["cached"] == 0
    # Every token of the first turn but the last (its last answer token was sampled, never fed)
    # is in every rank's cache (two full chunks and a partial one) and is loaded, up to the middle
    # of one of vLLM's blocks (128 tokens on the CPU build).
    reused = first["prompt"] + len(first["tokens"]) - 1
    assert reused > 2 * CHUNK
    assert reused % VLLM_CPU_BLOCK, "this prompt must end inside a block: the test is of mid-block loads"
    assert second["cached"] == reused
    tiny = SIZES["tiny"]
    shard_bytes_per_token = 2 * tiny.num_hidden_layers * (tiny.num_key_value_heads // 2) * tiny.head_size * 2
    for rank in report["ranks"]:
        assert rank["transfers"]["loaded_bytes"] == reused * shard_bytes_per_token  # half of the heads each
        assert rank["leases"] == 0
        (tier,) = rank["tiers"]
        assert tier["pinned"] == 0
