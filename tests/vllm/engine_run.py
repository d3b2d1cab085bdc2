"""Run real vLLM (CPU build) on the locally built model, with or without lmplug; write results as JSON.

Used by the end-to-end tests as a subprocess (vLLM spawns processes, so it needs a main guard):

    python tests/vllm/engine_run.py MODEL_DIR OUT.json [--lmplug CONFIG.yaml] [--rounds N]
        [--prompts PROMPTS.json] [--max-tokens N] [--max-model-len N] [--hold]

Each round generates greedily for the same prompts, then resets vLLM's own prefix cache
(unless ``--keep-prefix-cache``), so a later round can only reuse KV through lmplug. With
lmplug, each round also records the worker's cache statistics as they stand after it.
With ``--hold`` the engine stays up after writing its results, until its stdin closes (a
peer instance fetches from its memory meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 1100


def prompts() -> list[list[int]]:
    return [[(i * 37 + seed * 11) % 7000 + 10 for i in range(PROMPT_TOKENS)] for seed in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug config file (omit to run vLLM without a connector)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep-prefix-cache", action="store_true", help="let later rounds hit vLLM's own cache")
    parser.add_argument("--prompts", help="a JSON list of prompts (token id lists); default: two synthetic ones")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--hold", action="store_true", help="stay up after the results, until stdin closes")
    args = parser.parse_args()
    prompt_ids: list[list[int]] = json.loads(Path(args.prompts).read_text()) if args.prompts else prompts()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # A configured KV connector changes vLLM's CPU core reservation (and so float reduction
    # order); pin it so that runs with and without lmplug compute on the same cores.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from lmplug.integrations.vllm.lookup import LookupClient, socket_path

    engine_id = f"run-{os.getpid()}"
    extra = {}
    if args.lmplug:
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMPlugConnector", kv_role="kv_both", engine_id=engine_id,
            kv_connector_extra_config={"lmplug_config": args.lmplug},
        )  # fmt: skip
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
        max_model_len=args.max_model_len, seed=0,
        **extra,
    )  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, logprobs=3, detokenize=False)
    rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        rounds.append(
            {
                "seconds": time.perf_counter() - started,
                "requests": [
                    {
                        "tokens": list(out.outputs[0].token_ids),
                        "logprobs": [
                            {str(token): value.logprob for token, value in step.items()}
                            for step in out.outputs[0].logprobs or []
                        ],
                        "cached": out.num_cached_tokens,
                    }
                    for out in outputs
                ],
            }
        )
        if args.lmplug:  # every load of the round happened before the forward that needed it
            client = LookupClient(socket_path(engine_id))
            rounds[-1]["worker"] = client.statistics()
            client.close()
        if not args.keep_prefix_cache:
            llm.reset_prefix_cache()
    with open(args.out + ".part", "w") as handle:
        json.dump(rounds, handle)
    os.replace(args.out + ".part", args.out)  # whole, for a test that polls for it
    if args.hold:
        sys.stdin.read()


if __name__ == "__main__":
    main()
