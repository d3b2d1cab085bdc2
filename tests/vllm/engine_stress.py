"""Real vLLM (CPU build) with lmplug under preemption, aborts, short and partial prompts.

    python tests/vllm/engine_stress.py MODEL_DIR CONFIG.yaml OUT.json

vLLM's own KV cache is capped so that concurrent requests get preempted (and resumed);
some requests are aborted while waiting, while loading and while decoding. At the end
the script asks the worker's lmplug cache over its lookup channel for its statistics, so
the test can check that no lease, pin or chunk memory outlived its request.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

BLOCK = 128  # vLLM's CPU backend


def prompts() -> list[list[int]]:
    shared = [(i * 37) % 7000 + 10 for i in range(600)]
    long = [shared + [(i * 53 + seed * 101) % 7000 + 10 for i in range(500)] for seed in range(6)]
    short = [[(i * 13 + 5) % 7000 + 10 for i in range(100)]]  # shorter than a chunk
    partial = [[(i * 17 + 9) % 7000 + 10 for i in range(300)]]  # one chunk and a partial one
    return long + short + partial


def main() -> None:
    model, config, out = sys.argv[1:4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from lmplug.integrations.vllm.lookup import LookupClient, socket_path

    engine_id = f"stress-{os.getpid()}"
    llm = LLM(
        model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=2048, seed=0,
        num_gpu_blocks_override=2048 // BLOCK + 4, max_num_seqs=8, disable_log_stats=False,
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMPlugConnector", kv_role="kv_both", engine_id=engine_id,
            kv_connector_extra_config={"lmplug_config": config},
        ),
    )  # fmt: skip
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, detokenize=False)
    report: dict[str, Any] = {}

    def run(tag: str, abort_after: dict[str, int] | None = None) -> dict[str, int]:
        """Submit every prompt at once and step until done; abort some after a given step."""
        for index, prompt in enumerate(prompts()):
            engine.add_request(f"{tag}-{index}", TokensPrompt(prompt_token_ids=prompt), params)
        cached: dict[str, int] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    cached[output.request_id] = output.num_cached_tokens or 0
            steps += 1
            doomed = [rid for rid, at in (abort_after or {}).items() if at == steps]
            if doomed:
                engine.abort_request(doomed)
        return cached

    report["first"] = run("first")  # computes and stores; preempts under the capped cache
    llm.reset_prefix_cache()
    # Aborted right after being submitted (waiting, or looked up and leased), while loading, and while decoding.
    report["aborted"] = run("second", {"second-0": 1, "second-3": 2, "second-5": 6})
    llm.reset_prefix_cache()
    report["third"] = run("third")  # everything again, from lmplug
    report["preemptions"] = sum(
        int(metric.value) for metric in llm.get_metrics() if metric.name == "vllm:num_preemptions"
    )
    time.sleep(0.5)  # the worker finishes the last step's saves
    client = LookupClient(socket_path(engine_id))
    report["worker"] = client.statistics()
    client.close()
    with open(out, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
