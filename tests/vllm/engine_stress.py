"""Real vLLM (CPU build) with lmplug under preemption, aborts, short and partial prompts.

    python tests/vllm/engine_stress.py MODEL_DIR OUT.json [--lmplug CONFIG.yaml]

vLLM's own KV cache is capped so that concurrent requests get preempted (and resumed).
With lmplug, three rounds run the same prompts: the first computes and stores, in the
second some requests are aborted while waiting, while loading and while decoding, and the
third is served from lmplug. Every finished request's greedy tokens and top logprobs are
recorded, and after each round vLLM's count of the tokens it expected the connector to
load and the worker's lmplug statistics (asked over its lookup channel), so the test can
compare the outputs with vLLM alone, check that the KV was really loaded, and check that no
lease, pin or chunk memory outlived its request.

Without ``--lmplug`` it is that reference: one round of the same prompts on the same
capped vLLM, plus controls (``wrong_kv_prompts``) that show how far wrong KV moves the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

BLOCK = 128  # vLLM's CPU backend
CHUNK = 256  # the test's lmplug chunk size
MAX_TOKENS = 200
SHARED = 600  # leading tokens common to the long prompts
SHARED_BLOCKS = SHARED // BLOCK
CONTROL_TOKENS = 8


def prompts() -> list[list[int]]:
    shared = [(i * 37) % 7000 + 10 for i in range(SHARED)]
    long = [shared + [(i * 53 + seed * 101) % 7000 + 10 for i in range(500)] for seed in range(6)]
    short = [[(i * 13 + 5) % 7000 + 10 for i in range(100)]]  # shorter than a chunk
    partial = [[(i * 17 + 9) % 7000 + 10 for i in range(300)]]  # one chunk and a partial one
    return long + short + partial


def wrong_kv_prompts() -> list[list[int]]:
    """Each long prompt with tokens 512-1023 taken from the next one. vLLM's own cache holds
    at most the shared prefix's whole blocks (512 tokens) of a long prompt, so lmplug serves
    512-1023; these are what vLLM computes when a connector loads another request's KV there
    (the KV of those tokens is the same: the tokens before them are shared)."""
    long = prompts()[:6]
    span = slice(SHARED_BLOCKS * BLOCK, 4 * CHUNK)
    return [p[: span.start] + long[(i + 1) % len(long)][span] + p[span.stop :] for i, p in enumerate(long)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug config file (omit for the reference run, without a connector)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from lmplug.integrations.vllm.lookup import LookupClient, socket_path

    engine_id = f"stress-{os.getpid()}"
    extra = {}
    if args.lmplug:
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMPlugConnector", kv_role="kv_both", engine_id=engine_id,
            kv_connector_extra_config={"lmplug_config": args.lmplug},
        )  # fmt: skip
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=2048, seed=0,
        num_gpu_blocks_override=2048 // BLOCK + 4, max_num_seqs=8, disable_log_stats=False, **extra,
    )  # fmt: skip
    engine = llm.llm_engine
    greedy: dict[str, Any] = {"temperature": 0, "ignore_eos": True, "logprobs": 3, "detokenize": False}
    params = SamplingParams(max_tokens=MAX_TOKENS, **greedy)
    control_params = SamplingParams(max_tokens=CONTROL_TOKENS, **greedy)
    report: dict[str, Any] = {}

    def counter(name: str) -> int:
        return sum(int(metric.value) for metric in llm.get_metrics() if metric.name == name)

    def worker_statistics() -> dict[str, Any]:
        client = LookupClient(socket_path(engine_id))
        try:
            return client.statistics()
        finally:
            client.close()

    def run(
        tag: str, abort_after: dict[str, int] | None = None, controls: list[list[int]] | None = None
    ) -> dict[str, Any]:
        """Submit every prompt at once and step until done; abort some after a given step."""
        for index, prompt in enumerate(prompts()):
            engine.add_request(f"{tag}-{index}", TokensPrompt(prompt_token_ids=prompt), params)
        for index, prompt in enumerate(controls or []):
            engine.add_request(f"{tag}-control-{index}", TokensPrompt(prompt_token_ids=prompt), control_params)
        finished: dict[str, Any] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    completion = output.outputs[0]
                    finished[output.request_id] = {
                        "cached": output.num_cached_tokens or 0,
                        "tokens": list(completion.token_ids),
                        "logprobs": [
                            {str(token): value.logprob for token, value in step.items()}
                            for step in completion.logprobs or []
                        ],
                    }
            steps += 1
            doomed = [rid for rid, at in (abort_after or {}).items() if at == steps]
            if doomed:
                engine.abort_request(doomed)
        result: dict[str, Any] = {
            "outputs": finished,
            # Tokens vLLM expected from the connector (first scheduling of each request, so
            # ``num_cached_tokens`` less vLLM's own prefix-cache hits), all rounds so far.
            "external_hits": counter("vllm:external_prefix_cache_hits"),
        }
        if args.lmplug:  # every load of the round happened before the forward that needed it
            result["worker"] = worker_statistics()
        return result

    if not args.lmplug:
        report["reference"] = run("reference", controls=wrong_kv_prompts())
    else:
        report["first"] = run("first")  # computes and stores; preempts under the capped cache
        llm.reset_prefix_cache()
        # Aborted right after being submitted (waiting, or looked up and leased), while loading, and while decoding.
        report["second"] = run("second", {"second-0": 1, "second-3": 2, "second-5": 6})
        llm.reset_prefix_cache()
        report["third"] = run("third")  # everything again, from lmplug
        time.sleep(0.5)  # the worker finishes the last step's saves
        report["worker"] = worker_statistics()
    report["preemptions"] = counter("vllm:num_preemptions")
    with open(args.out, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
