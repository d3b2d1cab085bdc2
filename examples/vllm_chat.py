"""The main job: multi-round chat served by real vLLM, with and without lmplug.

Several users share a system prompt and grow their conversations round by round; each
request re-sends the whole conversation, as chat front-ends do. The same workload runs
twice, each in a fresh vLLM process: once as vLLM alone, once with lmplug's connector on
the embedded default stack (``configs/default.yaml``: one L1 host-memory tier). The
result is time-to-first-token (TTFT) per round, how many prompt tokens were reused rather
than recomputed, and the speed-up, as a table and a saved plot.

Why lmplug helps here: vLLM keeps KV only in its own (GPU) KV cache, which in production
is small next to host memory, so with many users a conversation's KV is evicted before
the user's next turn. To show that on a small machine, vLLM's KV cache is capped
(``--vllm-cache-tokens``, default 3,200 tokens) while lmplug's L1 holds 1 GiB (512k tokens
of this model). Both runs have the same cap.

The model is the locally built random-weight Llama (``lmplug.testing.vllm_model``),
so its words are noise: each assistant turn is scripted (fixed random tokens) so both runs
see exactly the same prompts; every request still generates ``--reply-tokens`` tokens.

    python examples/vllm_chat.py [--users 8] [--rounds 5] [--out out/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = "LMPLUG-DEMO "
MODES = ("vllm", "lmplug")
LABELS = {"vllm": "vLLM alone", "lmplug": "vLLM + lmplug"}


@dataclass(frozen=True)
class Workload:
    """The scripted conversations: token ids for the system prompt and every turn."""

    users: int
    rounds: int
    system_tokens: int
    turn_tokens: int
    seed: int = 0

    def _tokens(self, rng: random.Random, count: int) -> list[int]:
        return [rng.randrange(10, 7990) for _ in range(count)]

    def prompt(self, user: int, round_: int) -> list[int]:
        """What ``user`` sends in ``round_``: the system prompt, the conversation so far, the new turn."""
        system = self._tokens(random.Random(self.seed), self.system_tokens)
        rng = random.Random(self.seed * 1_000_003 + user + 1)
        tokens = list(system)
        for past in range(round_ + 1):
            turn = self.turn_tokens
            tokens += self._tokens(rng, rng.randrange(turn * 3 // 4, turn * 5 // 4 + 1))  # the user's turn
            if past < round_:
                tokens += self._tokens(rng, 64)  # the assistant's (scripted) reply
        return tokens


# --------------------------------------------------------------------------- one vLLM process


def emit(event: dict[str, Any]) -> None:
    print(MARK + json.dumps(event), flush=True)


def serve(args: argparse.Namespace) -> None:
    """Run the workload in this process on one vLLM engine (``--engine vllm|lmplug``)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # the same cores with and without a connector
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    extra: dict[str, Any] = {}
    if args.engine == "lmplug":
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMPlugConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"lmplug_config": str(args.config)},
        )
    block = 128  # vLLM's CPU backend uses 128-token blocks
    max_len = 3072
    llm = LLM(
        model=str(args.model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=max_len,
        seed=0,
        num_gpu_blocks_override=max(args.vllm_cache_tokens // block, max_len // block + 1),
        disable_log_stats=False,
        **extra,
    )
    params = SamplingParams(max_tokens=args.reply_tokens, temperature=0, ignore_eos=True, detokenize=False)
    # One unrelated request first: one-off warm-up costs are not any round's TTFT.
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 1100)))], params, use_tqdm=False)
    llm.reset_prefix_cache()
    emit({"event": "ready", "seconds": time.perf_counter() - started})
    workload = Workload(args.users, args.rounds, args.system_tokens, args.turn_tokens)
    for round_ in range(args.rounds):
        for user in range(args.users):
            prompt = workload.prompt(user, round_)
            began = time.perf_counter()
            (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            seconds = time.perf_counter() - began
            metrics = output.metrics
            ttft = getattr(metrics, "first_token_latency", 0.0) or seconds
            emit(
                {
                    "event": "request",
                    "round": round_ + 1,
                    "user": user,
                    "prompt_tokens": len(prompt),
                    "cached_tokens": output.num_cached_tokens or 0,
                    "ttft": ttft,
                    "seconds": seconds,
                }
            )


# --------------------------------------------------------------------------- the driver


def run_mode(mode: str, args: argparse.Namespace, log_dir: Path, progress: Any) -> list[dict[str, Any]]:
    """Start one vLLM process for ``mode`` and collect its request events, advancing ``progress``."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--engine",
        mode,
        "--model",
        str(args.model),
        "--config",
        str(args.config),
        "--users",
        str(args.users),
        "--rounds",
        str(args.rounds),
        "--system-tokens",
        str(args.system_tokens),
        "--turn-tokens",
        str(args.turn_tokens),
        "--reply-tokens",
        str(args.reply_tokens),
        "--vllm-cache-tokens",
        str(args.vllm_cache_tokens),
    ]
    log_path = log_dir / f"vllm-{mode}.log"
    progress.set_description(f"{LABELS[mode]}: starting vLLM")
    events: list[dict[str, Any]] = []
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        assert process.stdout is not None
        for line in _lines(process.stdout, log):
            event = json.loads(line)
            if event["event"] == "ready":
                progress.set_description(f"{LABELS[mode]}: serving")
            else:
                events.append(event)
                progress.update(1)
        if process.wait() != 0:
            raise SystemExit(f"the {LABELS[mode]} run failed (exit {process.returncode}); see {log_path}")
    return events


def _lines(stream: Any, log: Any) -> Iterator[str]:
    for line in stream:
        if line.startswith(MARK):
            yield line[len(MARK) :]
        else:
            log.write(line)


def summarise(results: dict[str, list[dict[str, Any]]], rounds: int) -> list[dict[str, float]]:
    rows = []
    for round_ in range(1, rounds + 1):
        row: dict[str, float] = {"round": round_}
        for mode in MODES:
            requests = [r for r in results[mode] if r["round"] == round_]
            row["prompt_tokens"] = statistics.mean(r["prompt_tokens"] for r in requests)
            row[f"{mode}_ttft"] = statistics.mean(r["ttft"] for r in requests)
            row[f"{mode}_reused"] = sum(r["cached_tokens"] for r in requests) / sum(
                r["prompt_tokens"] for r in requests
            )
        row["speedup"] = row["vllm_ttft"] / row["lmplug_ttft"]
        rows.append(row)
    return rows


def table(rows: list[dict[str, float]], results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        f"{'round':>5}  {'prompt':>7}  {'TTFT vLLM':>10}  {'TTFT +lmplug':>12}  {'speed-up':>8}  "
        f"{'reused vLLM':>11}  {'reused +lmplug':>14}",
    ]
    for row in rows:
        lines.append(
            f"{int(row['round']):>5}  {row['prompt_tokens']:>7.0f}  {row['vllm_ttft'] * 1e3:>8.1f}ms  "
            f"{row['lmplug_ttft'] * 1e3:>10.1f}ms  {row['speedup']:>7.2f}x  "
            f"{row['vllm_reused']:>11.0%}  {row['lmplug_reused']:>14.0%}"
        )
    totals = {mode: sum(r["ttft"] for r in results[mode]) for mode in MODES}
    reused = {
        mode: sum(r["cached_tokens"] for r in results[mode]) / sum(r["prompt_tokens"] for r in results[mode])
        for mode in MODES
    }
    lines.append(
        f"{'all':>5}  {'':>7}  {totals['vllm'] * 1e3:>8.0f}ms  {totals['lmplug'] * 1e3:>10.0f}ms  "
        f"{totals['vllm'] / totals['lmplug']:>7.2f}x  {reused['vllm']:>11.0%}  {reused['lmplug']:>14.0%}"
    )
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [int(row["round"]) for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for offset, mode in ((-width / 2, "vllm"), (width / 2, "lmplug")):
        left.bar([r + offset for r in rounds], [row[f"{mode}_ttft"] * 1e3 for row in rows], width, label=LABELS[mode])
        right.plot(rounds, [row[f"{mode}_reused"] * 100 for row in rows], marker="o", label=LABELS[mode])
    left.set(xlabel="round", ylabel="mean TTFT (ms)", title="Time to first token", xticks=rounds)
    right.set(xlabel="round", ylabel="prompt tokens reused (%)", title="KV reused", xticks=rounds, ylim=(0, 100))
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def drive(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from lmplug.testing.vllm_model import build_model

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"building the local {args.model_size} model (random weights, nothing downloaded) ...", flush=True)
    args.model = build_model(args.out / f"model-{args.model_size}", args.model_size)
    workload = Workload(args.users, args.rounds, args.system_tokens, args.turn_tokens)
    longest = len(workload.prompt(0, args.rounds - 1))
    print(
        f"{args.users} users x {args.rounds} rounds, a {args.system_tokens}-token shared system prompt, "
        f"prompts grow to ~{longest} tokens; vLLM's own KV cache capped at {args.vllm_cache_tokens} tokens; "
        f"lmplug stack: {args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    with tqdm(total=len(MODES) * args.users * args.rounds, unit="req", dynamic_ncols=True) as progress:
        for mode in MODES:
            results[mode] = run_mode(mode, args, args.out, progress)
    rows = summarise(results, args.rounds)
    print()
    print(table(rows, results))
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "requests": results}, indent=1))
    plot(rows, args.out / "ttft.png")
    print(f"\nplot: {args.out / 'ttft.png'}   data: {args.out / 'results.json'}   vLLM logs: {args.out}/vllm-*.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=1536)
    parser.add_argument("--turn-tokens", type=int, default=208, help="mean length of a user's turn")
    parser.add_argument("--reply-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--vllm-cache-tokens", type=int, default=3200, help="cap of vLLM's own KV cache")
    parser.add_argument("--model-size", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml", help="lmplug config")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="where results and the plot go")
    parser.add_argument("--engine", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.config = args.config.resolve()
    if args.engine:
        serve(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
