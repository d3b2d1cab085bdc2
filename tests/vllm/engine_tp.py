"""Real vLLM (CPU build) with tensor parallelism 2 and lmplug: one worker process and one cache per rank.

    python tests/vllm/engine_tp.py MODEL_DIR CONFIG.yaml OUT.json

Each rank runs on its own core (``VLLM_CPU_OMP_THREADS_BIND=0|1``; vLLM's automatic binding
refuses two CPU workers on a single NUMA node). A prompt is generated, then the next turn
(the prompt, its answer and more tokens) with vLLM's own prefix cache off, so the KV of the
first turn can only come from lmplug; then the script reads every rank's statistics over
its lookup channel.
"""

from __future__ import annotations

import json
import os
import sys

PROMPT_TOKENS = 600


def main() -> None:
    model, config, out = sys.argv[1:4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from lmplug.integrations.vllm.lookup import LookupClient, socket_path

    engine_id = f"tp-{os.getpid()}"
    llm = LLM(
        model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=2048, seed=0,
        tensor_parallel_size=2, distributed_executor_backend="mp", enable_prefix_caching=False,
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMPlugConnector", kv_role="kv_both", engine_id=engine_id,
            kv_connector_extra_config={"lmplug_config": config},
        ),
    )  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, detokenize=False)
    prompt = [(i * 37) % 7000 + 10 for i in range(PROMPT_TOKENS)]
    rounds = []
    for turn in range(2):
        if turn:
            prompt = prompt + rounds[-1]["tokens"] + [(i * 53) % 7000 + 10 for i in range(50)]
        (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        rounds.append(
            {
                "tokens": list(output.outputs[0].token_ids),
                "logprobs": [
                    {str(token): value.logprob for token, value in step.items()}
                    for step in output.outputs[0].logprobs or []
                ],
                "cached": output.num_cached_tokens,
                "prompt": len(prompt),
            }
        )
    ranks = []
    for rank in range(2):
        client = LookupClient(socket_path(engine_id, rank))
        ranks.append(client.statistics())
        client.close()
    with open(out, "w") as handle:
        json.dump({"rounds": rounds, "ranks": ranks}, handle)


if __name__ == "__main__":
    main()
