"""vLLM with lmplug on multi-round chat: TTFT and reuse against vLLM's own prefix cache.

Runs real vLLM (the CPU build here) on the locally built ``bench`` model (random weights,
8 layers, 4 KV heads of 64: 8 KiB of bfloat16 KV per token). The workload: 4 users x 4
rounds, one 3072-token system prompt shared by all, a new user turn of 256 tokens per user
and round, and a 16-token greedy answer (``ignore_eos``) that joins that user's
conversation as token ids, so round ``r`` sends ``system + (turn + answer) * r + turn``.
Requests run one at a time, round-major (round 0 of users 0..3, then round 1, ...). TTFT is
the wall time from ``add_request`` to the engine step that returns the request's first
token (``benchmarks/vllm_chat_engine.py`` drives ``llm.llm_engine`` itself).

Configurations, each in its own vLLM process (``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` for all,
so every one computes on the same single core):

- ``vllm``: vLLM alone, prefix caching off (every prompt recomputed);
- ``vllm_pc``: vLLM alone, prefix caching on, its KV cache (1 GiB) large enough to keep it all;
- ``lmplug``: vLLM + ``LMPlugConnector`` (one ``cpu`` tier of 2 GiB, 256-token chunks),
  prefix caching off, so every reused token comes from lmplug;
- ``lmplug_200`` and its reference ``vllm_pc_200``: the same with 200-token turns, so
  conversation boundaries do not fall on chunk boundaries;
- ``lmplug_disk``: lmplug with one ``disk`` tier alone (a disk-first stack) in a temporary
  directory ``.bench-chat-*`` under the repository root, removed afterwards.

Rows: the cold prompt (user 0's round 0 plus 3 unrelated cold prompts of the same length,
run before the workload: nothing cached anywhere) against vLLM alone; TTFT of the prompts
whose prefix is cached (rounds 1-3) and the mean TTFT of the workload against vLLM's own
prefix cache serving the same tokens; cached tokens of rounds 1-3 (vLLM's
``num_cached_tokens``) against every token of the user's previous request, prompt and
answer, but the last (whose KV is never computed); the connector's load and save bandwidth
against a same-process memcpy of an average transfer; and the disk-first stack's lookup
latency, when the connector reports it (a figure the run did not produce shows as ``nan``
and misses its target). About 4-6 minutes on two cores, so ``--quick`` skips it.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import Result, Settings, Stats, Target

NAME = "vllm_chat"
SUMMARY = "vLLM + lmplug, 4 users x 4 rounds of chat: TTFT vs vLLM's prefix cache (<= 1.05x), reuse, GB/s"
ROOT = Path(__file__).resolve().parents[1]

SYSTEM_TOKENS = 3072
ANSWER_TOKENS = 16
CHUNK_SIZE = 256


@dataclass(frozen=True, slots=True)
class Config:
    """One vLLM process: its turn length, vLLM's prefix cache, and the lmplug stack (``None``: no connector)."""

    key: str
    label: str
    turn_tokens: int
    prefix_caching: bool
    stack: dict[str, Any] | None = None


def _configs(disk: Path) -> list[Config]:
    def stack(tier: dict[str, Any]) -> dict[str, Any]:
        return {"chunk_size": CHUNK_SIZE, "tiers": [tier]}

    cpu = stack({"type": "cpu", "capacity": "2GiB"})
    return [
        Config("vllm", "vLLM PC off", 256, prefix_caching=False),
        Config("vllm_pc", "vLLM PC on", 256, prefix_caching=True),
        Config("lmplug", "lmplug cpu", 256, prefix_caching=False, stack=cpu),
        Config("lmplug_disk", "lmplug disk", 256, prefix_caching=False,
               stack=stack({"type": "disk", "path": str(disk), "capacity": "2GiB"})),
        Config("vllm_pc_200", "vLLM PC on", 200, prefix_caching=True),
        Config("lmplug_200", "lmplug cpu", 200, prefix_caching=False, stack=cpu),
    ]  # fmt: skip


def _engine(model: Path, work: Path, config: Config) -> dict[str, Any]:
    out = work / f"{config.key}.json"
    log = work / f"{config.key}.log"
    command = [
        sys.executable, "-m", "benchmarks.vllm_chat_engine", str(model), str(out),
        "--prefix-caching", "on" if config.prefix_caching else "off",
        "--turn-tokens", str(config.turn_tokens),
        "--system-tokens", str(SYSTEM_TOKENS),
        "--answer-tokens", str(ANSWER_TOKENS),
    ]  # fmt: skip
    if config.stack is not None:
        command += ["--lmplug", json.dumps(config.stack)]
    print(f"  {config.key}: {config.label}, {config.turn_tokens}-token turns ...", file=sys.stderr, flush=True)
    with log.open("w") as stream:
        result = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, timeout=1800, check=False)
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"vLLM run {config.key} failed (exit {result.returncode}):\n{text[-3000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["cores"] = [
        line.split("]", 1)[-1].strip() for line in text.splitlines() if "core ids=" in line or "reserved_cpus=" in line
    ]
    return report


def run(settings: Settings) -> list[Result]:
    if settings.quick:
        print("  vllm_chat: skipped with --quick (six vLLM processes, several minutes)", file=sys.stderr)
        return []
    try:
        import vllm  # noqa: F401
    except ImportError:
        return []
    from lmplug.testing.vllm_model import build_model

    model = build_model(ROOT / ".bench-models" / "bench", "bench")
    with tempfile.TemporaryDirectory(prefix=".bench-chat-", dir=ROOT) as scratch:
        work = Path(scratch)
        configs = _configs(work / "disk")
        reports = {config.key: _engine(model, work, config) for config in configs}
    _print_details(configs, reports)
    return [
        *_lmplug_rows("", reports["lmplug"], reports["vllm"], "vLLM PC off", reports["vllm_pc"]),
        *_lmplug_rows("200-tok turns: ", reports["lmplug_200"], reports["vllm_pc_200"], "vLLM PC on", None),
        *_disk_rows(reports["lmplug_disk"], reports["vllm_pc"]),
    ]


# ---------------------------------------------------------------------------- rows


def _cold(report: dict[str, Any]) -> Stats:
    """Cold prefills: the probes and the workload's first request (nothing cached for either)."""
    return Stats.of([*report["cold"], report["requests"][0]["ttft"]]).scaled(1e3)


def _rounds(report: dict[str, Any], first: int = 1) -> list[dict[str, Any]]:
    return [request for request in report["requests"] if request["round"] >= first]


def _expected(report: dict[str, Any]) -> dict[tuple[int, int], int]:
    """Tokens a perfect cache holds for each request of rounds >= 1: the user's previous prompt and answer, less one."""
    previous = {(request["user"], request["round"]): request["prompt_tokens"] for request in report["requests"]}
    return {(user, round_): previous[user, round_ - 1] + ANSWER_TOKENS - 1 for user, round_ in previous if round_ >= 1}


def _cached(report: dict[str, Any]) -> tuple[Stats, Stats]:
    """Total cached tokens of rounds >= 1, and what a perfect cache would have held."""
    expected = _expected(report)
    requests = _rounds(report)
    achieved = sum(request["cached_tokens"] for request in requests)
    wanted = sum(expected[request["user"], request["round"]] for request in requests)
    return Stats.of([achieved]), Stats.of([wanted])


def _ttft(requests: Sequence[dict[str, Any]]) -> Stats:
    return Stats.of([request["ttft"] for request in requests]).scaled(1e3)


def _mean_ttft(report: dict[str, Any]) -> Stats:
    return Stats.of([statistics.mean(request["ttft"] for request in report["requests"]) * 1e3])


def _missing() -> Stats:
    """A figure the run did not produce: shown as nan, and a MISS where it has a target."""
    return Stats.of([math.nan])


def _moved(report: dict[str, Any], direction: str) -> tuple[int, float]:
    """Bytes the connector moved in ``direction`` (``load`` or ``save``) and the seconds it spent."""
    transfers = report.get("worker", {}).get("transfers", {})
    past = {"load": "loaded", "save": "saved"}[direction]
    return transfers.get(f"{past}_bytes", 0), transfers.get(f"{direction}_seconds", 0.0)


def _bandwidth(report: dict[str, Any], direction: str) -> tuple[Stats, Stats]:
    moved, seconds = _moved(report, direction)
    samples = report.get("memcpy", {}).get(direction, {}).get("gbps", [])
    rate = Stats.of([moved / seconds / 1e9]) if seconds > 0 and moved > 0 else _missing()
    return rate, Stats.of(samples) if samples else _missing()


def _lookups(report: dict[str, Any]) -> dict[str, Any] | None:
    """The connector's scheduler-side lookup latencies, when it reports them (the worker's ``lookups``)."""
    lookups = report.get("worker", {}).get("lookups")
    if isinstance(lookups, dict) and isinstance(lookups.get("p99_ms"), int | float):
        return lookups
    return None


def _ms(value: object) -> str:
    return f"{value:.3f} ms" if isinstance(value, int | float) else "n/a"


def _lmplug_rows(
    prefix: str, lmplug: dict[str, Any], cold_reference: dict[str, Any], cold_name: str, pc: dict[str, Any] | None
) -> list[Result]:
    """The lmplug rows of one turn length; ``pc`` is vLLM's own prefix cache when it is not ``cold_reference``."""
    pc = pc or cold_reference
    first = lmplug["requests"][0]["prompt_tokens"]
    achieved, expected = _cached(lmplug)
    pc_achieved, pc_expected = _cached(pc)
    rows = [
        Result(NAME, f"{prefix}cold prompt TTFT ({first} tok), lmplug", "ms", _cold(lmplug),
               Target("<=", 1.03, relative=True), _cold(cold_reference), cold_name),
        Result(NAME, f"{prefix}TTFT with a cached prefix (rounds 1-3), lmplug", "ms", _ttft(_rounds(lmplug)),
               Target("<=", 1.05, relative=True), _ttft(_rounds(pc)), "vLLM PC"),
        Result(NAME, f"{prefix}cached tokens, rounds 1-3, lmplug", "tok", achieved,
               Target(">=", 1.0, relative=True), expected, "expected"),
        Result(NAME, f"{prefix}cached tokens, rounds 1-3, vLLM PC (128-tok blocks)", "tok", pc_achieved,
               None, pc_expected, "expected"),
        Result(NAME, f"{prefix}mean TTFT of the workload, lmplug", "ms", _mean_ttft(lmplug),
               Target("<=", 1.0, relative=True), _mean_ttft(pc), "vLLM PC"),
    ]  # fmt: skip
    for direction, label in (("load", "load (lmplug -> vLLM)"), ("save", "save (vLLM -> lmplug)")):
        rate, memcpy = _bandwidth(lmplug, direction)
        rows.append(
            Result(NAME, f"{prefix}connector {label}", "GB/s", rate, Target(">=", 0.5, relative=True), memcpy, "memcpy")
        )
    transfers = lmplug.get("worker", {}).get("transfers", {})
    requests = len(lmplug["requests"])
    for direction in ("load", "save"):
        waited = transfers.get(f"{direction}_wait_seconds")
        if isinstance(waited, int | float):
            rows.append(
                Result(NAME, f"{prefix}forward waited for {direction}s, per request", "ms",
                       Stats.of([waited / requests * 1e3]))
            )  # fmt: skip
    lookups = _lookups(lmplug)
    if lookups is not None:
        rows.append(Result(NAME, f"{prefix}lookup p99 (scheduler side)", "ms", Stats.of([lookups["p99_ms"]])))
    return rows


def _disk_rows(disk: dict[str, Any], pc: dict[str, Any]) -> list[Result]:
    lookups = _lookups(disk)
    p99 = Stats.of([lookups["p99_ms"]]) if lookups is not None else _missing()
    rate, memcpy = _bandwidth(disk, "load")
    return [
        Result(NAME, "disk-first: lookup p99 (scheduler side)" + ("" if lookups else ", n/a: not reported"), "ms",
               p99, Target("<=", 1.0)),
        Result(NAME, "disk-first: TTFT with a cached prefix (rounds 1-3)", "ms", _ttft(_rounds(disk)),
               None, _ttft(_rounds(pc)), "vLLM PC"),
        Result(NAME, "disk-first: connector load (lmplug -> vLLM)", "GB/s", rate, None, memcpy, "memcpy"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- details


def _print_details(configs: Sequence[Config], reports: dict[str, dict[str, Any]]) -> None:
    """Per-round TTFT and per-request cached tokens of every configuration, and the connector's counters."""
    lines = [f"\n{NAME}: {len(configs)} vLLM processes (PC: vLLM's own prefix cache)"]
    for config in configs:
        report = reports[config.key]
        cores = "; ".join(report["cores"]) or "binding not logged"
        lines.append(f"  {config.key:12} {config.label}, {config.turn_tokens}-tok turns: {cores}")
    for turn in dict.fromkeys(config.turn_tokens for config in configs):
        group = [config for config in configs if config.turn_tokens == turn]
        lines += ["", f"{turn}-token turns: mean TTFT per round (ms, over users)"]
        lines.append(f"{'round':>5}  {'prompt':>7}" + "".join(f"  {config.label:>12}" for config in group))
        rounds = sorted({request["round"] for request in reports[group[0].key]["requests"]})
        for round_ in rounds:
            at = {c.key: [r for r in reports[c.key]["requests"] if r["round"] == round_] for c in group}
            prompt = statistics.mean(r["prompt_tokens"] for r in at[group[0].key])
            lines.append(
                f"{round_:>5}  {prompt:>7.0f}"
                + "".join(f"  {statistics.mean(r['ttft'] for r in at[config.key]) * 1e3:>12.1f}" for config in group)
            )
        cold = "".join(f"  {statistics.mean(reports[config.key]['cold']) * 1e3:>12.1f}" for config in group)
        lines.append(f"{'cold':>5}  {'probes':>7}{cold}")
        lines += ["", f"{turn}-token turns: cached tokens per request (expected: previous prompt + answer - 1)"]
        lines.append(
            f"{'round':>5}  {'user':>4}  {'prompt':>6}  {'expected':>8}" + "".join(f"  {c.label:>12}" for c in group)
        )
        expected = _expected(reports[group[0].key])
        for index, request in enumerate(reports[group[0].key]["requests"]):
            key = (request["user"], request["round"])
            lines.append(
                f"{request['round']:>5}  {request['user']:>4}  {request['prompt_tokens']:>6}  "
                f"{expected.get(key, 0):>8}"
                + "".join(f"  {reports[c.key]['requests'][index]['cached_tokens']:>12}" for c in group)
            )
        reference = next((c for c in group if c.prefix_caching), group[0])
        for config in group:
            if config.stack is not None:
                lines.append(_connector_line(config, reports[config.key], reports[reference.key], reference))
    print("\n".join(lines), flush=True)


def _connector_line(config: Config, report: dict[str, Any], reference: dict[str, Any], ref_config: Config) -> str:
    moved = ", ".join(
        f"{direction} {nbytes / 2**20:.0f} MiB in {seconds * 1e3:.0f} ms"
        for direction in ("load", "save")
        for nbytes, seconds in [_moved(report, direction)]
    )
    lookups = _lookups(report)
    latency = (
        f"lookups {lookups.get('count')}: p50 {_ms(lookups.get('p50_ms'))}, p99 {_ms(lookups['p99_ms'])}, "
        f"max {_ms(lookups.get('max_ms'))}"
        if lookups is not None
        else "lookup latency n/a"
    )
    same = sum(
        mine["answer"] == theirs["answer"]
        for mine, theirs in zip(report["requests"], reference["requests"], strict=True)
    )
    answers = f"answers equal to {ref_config.key}'s: {same}/{len(report['requests'])}"
    return f"  {config.key}: {moved}; {latency}; {answers}"
