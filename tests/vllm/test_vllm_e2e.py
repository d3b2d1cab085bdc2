"""End to end with real vLLM (the CPU build) on a locally built random-weight Llama model."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

from agreement import compare
from engine_stress import BLOCK, CONTROL_TOKENS, SHARED_BLOCKS

from lmplug.core.serde import ChunkHeader, payload_checksum
from lmplug.testing.vllm_model import build_model

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


# Outputs are compared with ``agreement.compare``: identical greedy tokens (but for a near-tie
# that rounding may resolve either way) and top logprobs within bfloat16 rounding. Runs in
# different processes, or with and without cached KV, are not bitwise identical on a CPU, so
# no comparison here is exact; agreement.py derives the tolerance.
def differences(reference: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """How the requests of a round ``candidate`` disagree with those of ``reference`` (empty: they agree)."""
    pairs = zip(reference["requests"], candidate["requests"], strict=True)
    return [f"request {i}: {result.mismatch}" for i, (a, b) in enumerate(pairs) if not (result := compare(a, b)).ok]


def cached(round_: dict[str, Any]) -> list[int]:
    """vLLM's claim: prompt tokens it did not compute (its own prefix cache plus the connector's)."""
    return [r["cached"] for r in round_["requests"]]


def loaded_bytes(round_: dict[str, Any]) -> int:
    """Bytes of KV the worker's connector copied out of lmplug, all rounds up to this one."""
    return int(round_["worker"]["transfers"]["loaded_bytes"])


def kv_bytes_per_token(model: Path) -> int:
    """K and V of every layer in bfloat16: for the tiny model 2 * 4 layers * 2 heads * 64 * 2 bytes = 2 KiB."""
    config = json.loads((model / "config.json").read_text())
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * int(config["num_hidden_layers"]) * int(config["num_key_value_heads"]) * int(head_size) * 2


@pytest.fixture(scope="session")
def alone(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """vLLM without lmplug, two rounds: a full prefill, then the same prompts from vLLM's own prefix cache."""
    rounds = run_engine(model_dir, tmp_path_factory.mktemp("alone"), "alone", rounds=2, keep_prefix_cache=True)
    assert cached(rounds[1]) == [4 * CHUNK, 4 * CHUNK]
    return rounds


def write_config(path: Path, tiers: list[dict[str, Any]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"chunk_size": CHUNK, "tiers": tiers}))
    return path


def test_kv_from_lmplug_gives_identical_outputs(model_dir: Path, alone: list[Any], tmp_path: Path) -> None:
    config = write_config(tmp_path / "lmplug.yaml", [{"type": "cpu", "capacity": "256MiB"}])
    first, second = run_engine(model_dir, tmp_path, "lmplug", config, rounds=2)
    assert cached(first) == [0, 0]
    assert loaded_bytes(first) == 0
    # vLLM's own prefix cache was reset: these tokens came from lmplug (4 full chunks of 1100),
    # and their KV was really copied in (a load that failed into a recompute would not count).
    assert cached(second) == [4 * CHUNK, 4 * CHUNK]
    assert loaded_bytes(second) >= 2 * 4 * CHUNK * kv_bytes_per_token(model_dir)
    # Reference: vLLM alone, its second round served by its own prefix cache (the same 1024 tokens).
    alone_first, alone_second = alone
    assert not differences(alone_first, first)  # lmplug on a miss changes nothing
    assert not differences(alone_second, second)  # KV from lmplug serves as KV from vLLM's own cache
    assert not differences(first, second)


def test_a_second_process_reuses_kv_and_the_kv_is_really_used(model_dir: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    config = write_config(
        tmp_path / "lmplug.yaml", [{"type": "cpu", "capacity": "256MiB"}, {"type": "disk", "path": str(disk)}]
    )
    (writer,) = run_engine(model_dir, tmp_path, "writer", config)
    files = sorted(disk.glob("lmplug-*/??/*.kv"))
    # Two prompts, four full chunks each (and whatever partial chunks the connector keeps),
    # written behind and drained at shutdown.
    assert len(files) >= 2 * 4

    (reader,) = run_engine(model_dir, tmp_path, "reader", config)
    assert cached(reader) == [4 * CHUNK, 4 * CHUNK]
    assert loaded_bytes(reader) >= 2 * 4 * CHUNK * kv_bytes_per_token(model_dir)
    assert not differences(writer, reader)

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
    assert cached(tampered) == [4 * CHUNK, 4 * CHUNK]
    assert loaded_bytes(tampered) >= 2 * 4 * CHUNK * kv_bytes_per_token(model_dir)  # served, not refused
    # Every request's output moved beyond what rounding explains: wrong KV is visible.
    assert len(differences(reader, tampered)) == len(reader["requests"])


def test_a_failing_tier_degrades_to_recompute(model_dir: Path, tmp_path: Path) -> None:
    """The worker promised KV the disk then cannot deliver (corrupt files): vLLM recomputes, outputs unchanged."""
    disk = tmp_path / "disk"
    config = write_config(tmp_path / "lmplug.yaml", [{"type": "disk", "path": str(disk)}])
    (writer,) = run_engine(model_dir, tmp_path, "writer", config)
    files = sorted(disk.glob("lmplug-*/??/*.kv"))
    assert len(files) >= 2 * 4
    for path in files:  # damage every payload; the index (names, sizes) still promises them
        data = bytearray(path.read_bytes())
        data[4096 + 100] ^= 0xFF
        path.write_bytes(bytes(data))
    (reader,) = run_engine(model_dir, tmp_path, "reader", config)
    assert loaded_bytes(reader) == 0  # no stored chunk is intact: nothing may reach vLLM's KV cache
    assert not differences(writer, reader)  # recomputed from scratch
    # At least the first damaged chunk of each prompt was dropped at its read and stored again
    # from the recomputed KV.
    valid = 0
    for path in sorted(disk.glob("lmplug-*/??/*.kv")):
        data = path.read_bytes()
        header = ChunkHeader.unpack(data[:4096])
        valid += payload_checksum(memoryview(data)[4096 : 4096 + header.nbytes]) == header.checksum
    assert valid >= 2


def run_stress(model: Path, tmp_path: Path, name: str, config: Path | None = None) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(HERE / "engine_stress.py"), str(model), str(out)]
    if config is not None:
        command += ["--lmplug", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_preemption_aborts_and_partial_prompts_leak_nothing(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "lmplug.yaml"
    config.write_text("chunk_size: 256\nsave_partial_chunks: true\ntiers:\n  - type: cpu\n    capacity: 256MiB\n")
    reference = run_stress(model_dir, tmp_path, "reference")["reference"]["outputs"]  # vLLM alone
    report = run_stress(model_dir, tmp_path, "stress", config)
    assert report["preemptions"] > 0  # the capped vLLM cache did preempt (and resume) requests
    rounds = {tag: report[tag] for tag in ("first", "second", "third")}
    assert sorted(rounds["second"]["outputs"]) == ["second-1", "second-2", "second-4", "second-6", "second-7"]
    third = rounds["third"]["outputs"]
    # Claimed from lmplug: the four whole chunks, or every token but the last (1100 - 1) where the
    # partial chunk saved when the earlier request finished was already stored.
    assert all(4 * CHUNK <= third[f"third-{i}"]["cached"] <= 1100 - 1 for i in range(6)), third
    assert third["third-6"]["cached"] == 0  # shorter than a chunk: nothing to reuse

    # Every finished request, in every round, generates what vLLM alone generates for its prompt.
    # Round three starts each long prompt on 1024 tokens of KV, of which vLLM's own cache holds
    # at most the shared prefix's 512 and lmplug the rest; requests resumed after a preemption
    # continue on KV reloaded mid-generation, which the later steps check.
    expected = {rid.split("-", 1)[1]: output for rid, output in reference.items()}
    problems, compared, generated = [], 0, 0
    for outputs in (round_["outputs"] for round_ in rounds.values()):
        for rid, output in sorted(outputs.items()):
            agreement = compare(expected[rid.split("-", 1)[1]], output)
            compared += agreement.steps
            generated += len(output["tokens"])
            if not agreement.ok:
                problems.append(f"{rid} (cached {output['cached']}): {agreement.mismatch}")
    assert not problems, "\n".join(problems)
    # A near-tie resolved the other way ends a comparison early; it cannot end most of them.
    assert compared >= generated // 2

    # The KV behind those claims was loaded, not silently recomputed after a failed load: vLLM
    # counts the tokens it expects from the connector (its claims less its own prefix-cache
    # hits), at least the 512 unshared of every long prompt; loads on resume come on top.
    external = rounds["third"]["external_hits"] - rounds["second"]["external_hits"]
    assert external >= 6 * (4 * CHUNK - SHARED_BLOCKS * BLOCK)
    loaded = (
        rounds["third"]["worker"]["transfers"]["loaded_bytes"] - rounds["second"]["worker"]["transfers"]["loaded_bytes"]
    )
    assert loaded >= external * kv_bytes_per_token(model_dir)

    # Control: this comparison tells wrong KV apart. Each long prompt with tokens 512-1023 from
    # the next one is what vLLM computes on top of the next request's KV loaded there; every
    # one differs from its prompt's reference within its first steps. (A connector that loads
    # nothing there leaves zeroed or stale KV instead, as wrong as another request's.)
    for index in range(6):
        right = {key: expected[str(index)][key][:CONTROL_TOKENS] for key in ("tokens", "logprobs")}
        assert not compare(right, expected[f"control-{index}"]).ok, index

    worker = report["worker"]
    # Nothing outlived its request: no leases, no pins, and the only chunk memory in use is the tier's own.
    assert (worker["requests_with_leases"], worker["leases"]) == (0, 0)
    (tier,) = worker["tiers"]
    assert tier["pinned"] == 0
    assert worker["allocator"]["used_bytes"] == tier["used_bytes"]
    assert tier["errors"] == 0


@pytest.mark.skipif(
    importlib.util.find_spec("lmplug_remote") is None, reason="the remote tier comes with lmplug-remote"
)
def test_a_hung_shared_store_costs_only_a_miss(model_dir: Path, alone: list[Any], tmp_path: Path) -> None:
    """A remote store that accepts connections and never answers: every call times out, the
    breaker opens, and vLLM serves what it serves alone."""
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # listens; never accepts or answers
        port = black_hole.getsockname()[1]
        config = write_config(
            tmp_path / "lmplug.yaml",
            [{"type": "remote", "url": f"lm://127.0.0.1:{port}", "timeout": "200ms", "write_timeout": "200ms"}],
        )
        first, second = run_engine(model_dir, tmp_path, "hung", config, rounds=2)
    # The store never answered: whatever round two reused (vLLM's own cache was reset) came from
    # lmplug's own queue of unsent writes, and was loaded in full.
    assert loaded_bytes(second) - loaded_bytes(first) >= sum(cached(second)) * kv_bytes_per_token(model_dir)
    assert not differences(alone[0], first)
    assert not differences(alone[0], second)
