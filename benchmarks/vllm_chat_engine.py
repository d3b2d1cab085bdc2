"""One vLLM process for :mod:`benchmarks.vllm_chat` (vLLM spawns workers, so it runs as a script).

    python -m benchmarks.vllm_chat_engine MODEL OUT.json --turn-tokens 256 --prefix-caching off [--lmplug JSON]

Serves the multi-round chat workload one request at a time, round-major: every user's
round-0 prompt (the shared system prompt and the user's first turn), then every user's
round 1 (the whole conversation so far, the greedy answer included, and a new turn), and so
on. Each request is driven through ``llm.llm_engine`` step by step, so one request gives
both its time to first token (from ``add_request`` to the step that returns its first
token) and its answer, which joins that user's conversation as token ids.

Before the workload: one warm-up request, then ``--probes`` cold prompts of the round-0
length that share nothing with the workload or each other (samples of a cold prefill).
With ``--lmplug`` (an lmplug stack as JSON, the connector's ``lmplug_config``) it reads the
worker's statistics at the end and times a single-threaded ``torch`` copy of the bytes of
an average load and save, the same-run reference for the connector's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

from benchmarks.vllm_setup import connector, prepare_environment

MiB = 1024**2
VOCAB = (10, 7990)  # token ids drawn from [10, 7990): clear of the specials at the bottom of the vocabulary


def tokens(seed: str, count: int) -> list[int]:
    """``count`` token ids that depend on ``seed`` only (string seeds are stable across runs)."""
    rng = random.Random(seed)
    return [rng.randrange(*VOCAB) for _ in range(count)]


def memcpy_gbps(sizes: dict[str, int], rotate: int = 128 * MiB) -> dict[str, list[float]]:
    """GB/s of one-thread ``dst.copy_(src)`` of each size, sampled as the harness does; a sample
    rotates over enough buffer pairs to move ``rotate`` bytes, so copies run from DRAM, not the CPU cache."""
    import torch

    from benchmarks.harness import Settings, sample_sync

    def case(nbytes: int) -> Callable[[], float]:
        sources = [torch.empty(nbytes, dtype=torch.uint8).random_() for _ in range(max(1, -(-rotate // nbytes)))]
        pairs = [(source, torch.empty_like(source)) for source in sources]

        def sample() -> float:
            started = time.perf_counter()
            for source, target in pairs:
                target.copy_(source)
            return len(pairs) * nbytes / (time.perf_counter() - started) / 1e9

        return sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = sample_sync({name: case(nbytes) for name, nbytes in sizes.items()}, Settings())
    finally:
        torch.set_num_threads(threads)
    return {name: list(values.samples) for name, values in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug stack as JSON (omit for vLLM without a connector)")
    parser.add_argument("--prefix-caching", choices=("on", "off"), required=True, help="vLLM's own prefix cache")
    parser.add_argument("--turn-tokens", type=int, default=256)
    parser.add_argument("--system-tokens", type=int, default=3072)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--probes", type=int, default=3, help="extra cold prompts of the round-0 length")
    args = parser.parse_args()
    prepare_environment(1)  # GiB: 128k tokens of the bench model, all of the workload
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt

    engine_id = f"bench-chat-{os.getpid()}"
    extra = connector(engine_id, json.loads(args.lmplug) if args.lmplug else None)
    first_prompt = args.system_tokens + args.turn_tokens
    longest = first_prompt + (args.rounds - 1) * (args.turn_tokens + args.answer_tokens) + args.answer_tokens
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=-(-longest // 128) * 128,
        enable_prefix_caching=args.prefix_caching == "on",
        seed=0,
        disable_log_stats=False,
        **extra,
    )
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0, ignore_eos=True, detokenize=False)

    def serve(request_id: str, prompt: list[int]) -> dict[str, Any]:
        """One request alone on the engine: TTFT, wall time, cached tokens and the answer."""
        started = time.perf_counter()
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
        ttft: float | None = None
        while True:
            outputs = [output for output in engine.step() if output.request_id == request_id]
            now = time.perf_counter()
            for output in outputs:
                assert isinstance(output, RequestOutput)
                answer = list(output.outputs[0].token_ids)
                if ttft is None and answer:
                    ttft = now - started
                if output.finished:
                    return {
                        "prompt_tokens": len(prompt),
                        "cached_tokens": output.num_cached_tokens or 0,
                        "ttft": ttft,
                        "seconds": now - started,
                        "answer": answer,
                    }

    system = tokens("system", args.system_tokens)
    serve("warm-up", tokens("warm-up", first_prompt))
    llm.reset_prefix_cache()  # its KV is no help to any later prompt, but do not keep it around
    cold = [serve(f"cold-{i}", tokens(f"cold-{i}", first_prompt))["ttft"] for i in range(args.probes)]
    conversations = [list(system) for _ in range(args.users)]
    requests = []
    for round_ in range(args.rounds):
        for user in range(args.users):
            conversation = conversations[user]
            conversation += tokens(f"turn-{user}-{round_}-{args.turn_tokens}", args.turn_tokens)
            served = serve(f"user-{user}-round-{round_}", list(conversation))
            conversation += served["answer"]
            requests.append({"user": user, "round": round_, **served})

    report: dict[str, Any] = {"cold": cold, "requests": requests, "environ": _vllm_environ()}
    if args.lmplug:
        from lmplug.integrations.vllm.lookup import LookupClient, socket_path

        time.sleep(0.5)  # the last step's saves finish after its output is returned
        client = LookupClient(socket_path(engine_id))
        try:
            worker: dict[str, Any] = client.statistics()
        finally:
            client.close()
        report["worker"] = worker
        transfers = worker.get("transfers", {})
        loads = sum(1 for request in requests if request["cached_tokens"])
        saves = 1 + args.probes + len(requests)  # every request prefills new full chunks
        sizes = {
            "load": transfers.get("loaded_bytes", 0) // loads if loads else 0,
            "save": transfers.get("saved_bytes", 0) // saves,
        }
        rates = memcpy_gbps({name: size for name, size in sizes.items() if size})
        report["memcpy"] = {name: {"bytes": size, "gbps": rates.get(name, [])} for name, size in sizes.items()}
    with open(args.out, "w") as handle:
        json.dump(report, handle)


def _vllm_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith("VLLM_CPU_")}


if __name__ == "__main__":
    main()
