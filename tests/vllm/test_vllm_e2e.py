"""End to end with real vLLM (the CPU build) on a locally built random-weight Llama model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

from lmplug.core.serde import ChunkHeader, payload_checksum
from lmplug.integrations.vllm.model import build_model

HERE = Path(__file__).parent
CHUNK = 256


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model"), "tiny")


def run_engine(
    model: Path,
    tmp_path: Path,
    name: str,
    config: Path | None = None,
    rounds: int = 1,
    *,
    keep_prefix_cache: bool = False,
) -> list[Any]:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(HERE / "engine_run.py"), str(model), str(out), "--rounds", str(rounds)]
    if config is not None:
        command += ["--lmplug", str(config)]
    if keep_prefix_cache:
        command.append("--keep-prefix-cache")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    rounds_data: list[Any] = json.loads(out.read_text())
    return rounds_data


def same_generation(a: dict[str, Any], b: dict[str, Any], tolerance: float = 0.0) -> bool:
    """Identical greedy tokens and top logprobs (exactly, or within ``tolerance``)."""
    if [r["tokens"] for r in a["requests"]] != [r["tokens"] for r in b["requests"]]:
        return False
    for left, right in zip(a["requests"], b["requests"], strict=True):
        for step_a, step_b in zip(left["logprobs"], right["logprobs"], strict=True):
            if step_a.keys() != step_b.keys() or any(abs(step_a[k] - step_b[k]) > tolerance for k in step_a):
                return False
    return True


# A full prefill and a prefill on top of cached KV run differently shaped kernels, so their
# logits may differ in the last bfloat16 bits; the same cached prefix must give exactly the same.
BF16_TOLERANCE = 0.02


def write_config(path: Path, tiers: list[dict[str, Any]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"chunk_size": CHUNK, "tiers": tiers}))
    return path


def test_kv_from_lmplug_gives_identical_outputs(model_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "lmplug.yaml", [{"type": "cpu", "capacity": "256MiB"}])
    first, second = run_engine(model_dir, tmp_path, "lmplug", config, rounds=2)
    assert [r["cached"] for r in first["requests"]] == [0, 0]
    # vLLM's own prefix cache was reset: these tokens came from lmplug (4 full chunks of 1100).
    assert [r["cached"] for r in second["requests"]] == [4 * CHUNK, 4 * CHUNK]
    # Reference: vLLM alone, its second round served by its own prefix cache (the same 1024 tokens).
    alone_first, alone_second = run_engine(model_dir, tmp_path, "alone", rounds=2, keep_prefix_cache=True)
    assert [r["cached"] for r in alone_second["requests"]] == [4 * CHUNK, 4 * CHUNK]
    assert same_generation(alone_first, first)  # lmplug on a miss changes nothing
    assert same_generation(alone_second, second)  # KV from lmplug == KV from vLLM's own cache, exactly
    assert same_generation(first, second, BF16_TOLERANCE)


def test_a_second_process_reuses_kv_and_the_kv_is_really_used(model_dir: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    config = write_config(
        tmp_path / "lmplug.yaml", [{"type": "cpu", "capacity": "256MiB"}, {"type": "disk", "path": str(disk)}]
    )
    (writer,) = run_engine(model_dir, tmp_path, "writer", config)
    files = sorted(disk.glob("lmplug-*/??/*.kv"))
    assert len(files) == 2 * 4  # two prompts, four full chunks each, written behind and drained at shutdown

    (reader,) = run_engine(model_dir, tmp_path, "reader", config)
    assert [r["cached"] for r in reader["requests"]] == [4 * CHUNK, 4 * CHUNK]
    assert same_generation(writer, reader, BF16_TOLERANCE)

    # Control: rewrite every stored chunk with different (validly checksummed) KV; the output changes.
    for path in files:
        data = bytearray(path.read_bytes())
        header = ChunkHeader.unpack(data[:4096])
        payload = torch.frombuffer(data, dtype=torch.bfloat16, offset=4096, count=header.nbytes // 2)
        payload.mul_(-1.0)
        checksum = payload_checksum(memoryview(data)[4096 : 4096 + header.nbytes])
        packed = ChunkHeader(
            header.key, header.layers, header.tokens, header.hidden, header.dtype_code, header.nbytes, checksum
        ).pack()
        data[: len(packed)] = packed
        path.write_bytes(bytes(data))
    (tampered,) = run_engine(model_dir, tmp_path, "tampered", config)
    assert [r["cached"] for r in tampered["requests"]] == [4 * CHUNK, 4 * CHUNK]
    assert not same_generation(reader, tampered, BF16_TOLERANCE)


def test_a_failing_tier_degrades_to_recompute(model_dir: Path, tmp_path: Path) -> None:
    """The worker promised KV the disk then cannot deliver (corrupt files): vLLM recomputes, outputs unchanged."""
    disk = tmp_path / "disk"
    config = write_config(tmp_path / "lmplug.yaml", [{"type": "disk", "path": str(disk)}])
    (writer,) = run_engine(model_dir, tmp_path, "writer", config)
    files = sorted(disk.glob("lmplug-*/??/*.kv"))
    assert len(files) == 2 * 4
    for path in files:  # damage every payload; the index (names, sizes) still promises them
        data = bytearray(path.read_bytes())
        data[4096 + 100] ^= 0xFF
        path.write_bytes(bytes(data))
    (reader,) = run_engine(model_dir, tmp_path, "reader", config)
    assert same_generation(writer, reader)  # recomputed from scratch: exactly the first run
    # The first damaged chunk of each prompt was dropped at its read and stored again from the
    # recomputed KV (the read stops at the first bad chunk; later ones are dropped when reached).
    valid = 0
    for path in sorted(disk.glob("lmplug-*/??/*.kv")):
        data = path.read_bytes()
        header = ChunkHeader.unpack(data[:4096])
        valid += payload_checksum(memoryview(data)[4096 : 4096 + header.nbytes]) == header.checksum
    assert valid == 2


def test_preemption_aborts_and_partial_prompts_leak_nothing(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "lmplug.yaml"
    config.write_text("chunk_size: 256\nsave_partial_chunks: true\ntiers:\n  - type: cpu\n    capacity: 256MiB\n")
    out = tmp_path / "stress.json"
    result = subprocess.run(
        [sys.executable, str(HERE / "engine_stress.py"), str(model_dir), str(config), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["preemptions"] > 0  # the capped vLLM cache did preempt (and resume) requests
    assert sorted(report["aborted"]) == ["second-1", "second-2", "second-4", "second-6", "second-7"]
    long_prompts = [f"third-{i}" for i in range(6)]
    assert [report["third"][rid] for rid in long_prompts] == [4 * CHUNK] * 6  # still served from lmplug
    assert report["third"]["third-6"] == 0  # shorter than a chunk: nothing to reuse
    worker = report["worker"]
    # Nothing outlived its request: no leases, no pins, and the only chunk memory in use is the tier's own.
    assert (worker["requests_with_leases"], worker["leases"]) == (0, 0)
    (tier,) = worker["tiers"]
    assert tier["pinned"] == 0
    assert worker["allocator"]["used_bytes"] == tier["used_bytes"]
    assert tier["errors"] == 0


def test_a_hung_shared_store_costs_only_a_miss(model_dir: Path, tmp_path: Path) -> None:
    """A remote store that accepts connections and never answers: every call times out, the
    breaker opens, and vLLM serves exactly what it serves alone."""
    pytest.importorskip("lmplug_remote", reason="the remote tier comes with lmplug-remote")
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # listens; never accepts or answers
        port = black_hole.getsockname()[1]
        config = write_config(
            tmp_path / "lmplug.yaml",
            [{"type": "remote", "url": f"lm://127.0.0.1:{port}", "timeout": "200ms", "write_timeout": "200ms"}],
        )
        first, second = run_engine(model_dir, tmp_path, "hung", config, rounds=2)
    alone_first, alone_second = run_engine(model_dir, tmp_path, "alone", rounds=2)
    assert [r["cached"] for r in second["requests"]] == [0, 0]
    assert same_generation(alone_first, first)
    assert same_generation(alone_second, second)
