"""vLLM with lmplug: TTFT on a hit vs a cold prefill, miss overhead, connector bandwidth.

Runs real vLLM (the CPU build here) on the locally built ``bench`` model (random weights,
8 layers, 4 KV heads of 64: 8 KiB of bfloat16 KV per token), each configuration in its own
process (``benchmarks/vllm_engine.py``):

- TTFT, hit vs cold, per context length (2k, 8k, 16k tokens; 1k with ``--quick``): a unique
  prompt is served cold (full prefill; its chunks are stored), vLLM's own prefix cache is
  reset, and the same prompt is served again: its KV comes from lmplug's L1 except the last
  partial chunk (vLLM always computes at least the last token). TTFT is vLLM's own
  ``first_token_latency`` of a one-token generation. Target: hit <= 0.25x cold at 8k.
- Miss overhead: throughput (prompt + generated tokens per second) of batches of unique
  prompts, vLLM with lmplug (every lookup misses, every chunk is stored) vs vLLM without a
  connector, in two processes run one after the other. Target >= 0.97x.
- Connector bandwidth (info): bytes the connector moved from lmplug into vLLM's KV cache
  (fetch plus per-layer scatter) and from vLLM's cache into lmplug (per-layer gather plus
  store), over the time it spent, against a same-run ``torch`` copy of 64 MiB.

The stack is one ``cpu`` tier of 2 GiB; the model geometry comes from vLLM. vLLM runs with
``enforce_eager`` and one compute core (vLLM reserves the other); expect about 10 minutes
for a full run on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Result, Settings, Stats, Target

NAME = "vllm_ttft"
SUMMARY = "vLLM + lmplug: TTFT hit vs cold (<= 0.25x at 8k), miss throughput (>= 0.97x), connector GB/s"
ROOT = Path(__file__).resolve().parents[1]


def _engine(model: Path, out: Path, options: list[str], config: Path | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.vllm_engine", str(model), str(out), *options]
    if config is not None:
        command += ["--lmplug", str(config)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"vLLM run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _memcpy_gbps(nbytes: int = 64 * 2**20, repeats: int = 5) -> Stats:
    source = torch.empty(nbytes, dtype=torch.uint8).random_()
    target = torch.empty_like(source)
    target.copy_(source)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        samples.append(nbytes / (time.perf_counter() - started) / 1e9)
    return Stats.of(samples)


def run(settings: Settings) -> list[Result]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return []
    from lmplug.testing.vllm_model import build_model

    contexts = [1024] if settings.quick else [2048, 8192, 16384]
    samples = 1 if settings.quick else 2
    batch = ["--batch", "4", "--batch-tokens", "512", "--batch-rounds", "1"] if settings.quick else []
    with tempfile.TemporaryDirectory(prefix="lmplug-bench-") as scratch:
        work = Path(scratch)
        model = build_model(ROOT / ".bench-models" / "bench", "bench")
        config = work / "lmplug.yaml"
        config.write_text("chunk_size: 256\ntiers:\n  - type: cpu\n    capacity: 2GiB\n")
        options = ["--contexts", ",".join(map(str, contexts)), "--samples", str(samples), *batch]
        if settings.quick:
            options += ["--max-model-len", "2048"]
        with_cache = _engine(model, work / "lmplug.json", options, config)
        alone = _engine(model, work / "alone.json", [*batch, "--max-model-len", "2048"], None)
    results = []
    for context in contexts:
        row = with_cache["ttft"][str(context)]
        target = Target("<=", 0.25, relative=True) if context == 8192 else None
        results.append(
            Result(
                NAME,
                f"TTFT on a hit, {context // 1024}k-token prompt",
                "ms",
                Stats.of(row["hit"]).scaled(1e3),
                target,
                Stats.of(row["cold"]).scaled(1e3),
                "cold",
            )
        )
    results.append(
        Result(
            NAME,
            "throughput of unique prompts (all misses)",
            "tok/s",
            Stats.of(with_cache["throughput"]),
            Target(">=", 0.97, relative=True),
            Stats.of(alone["throughput"]),
            "vLLM alone",
        )
    )
    transfers = with_cache["worker"]["transfers"]
    memcpy = _memcpy_gbps()
    for direction, moved, seconds in (
        ("load (lmplug -> vLLM)", transfers["loaded_bytes"], transfers["load_seconds"]),
        ("save (vLLM -> lmplug)", transfers["saved_bytes"], transfers["save_seconds"]),
    ):
        if seconds > 0:
            rate = Stats.of([moved / seconds / 1e9])
            results.append(Result(NAME, f"connector {direction}", "GB/s", rate, None, memcpy, "memcpy"))
    return results
