"""Run real vLLM (CPU build) on the RAG-shaped prompts of the blend tests; write results as JSON.

    python tests/vllm/engine_blend.py MODEL_DIR OUT.json [--lmplug CONFIG.yaml]

Without ``--lmplug``: vLLM alone, the reference. With it (a config with ``extensions.blend``):
the first prompt is computed exactly and its passages cached when it finishes; vLLM's own
prefix cache is reset after every request, so later prompts can reuse passages only through
lmplug-blend. Each request records its greedy tokens and top logprobs, the blend counters after
it, and how many leading tokens of its prompt lmplug holds under prefix keys afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

SYSTEM_TOKENS, PASSAGE_TOKENS, QUESTION_TOKENS = 40, 300, 20


def part(seed: int, length: int) -> list[int]:
    return [(i * 37 + seed * 101) % 7000 + 10 for i in range(length)]


def build(parts: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The prompt of ``parts``, and a span for each part but the first (system) and the last (question)."""
    tokens: list[int] = []
    spans: list[list[int]] = []
    for index, piece in enumerate(parts):
        if 0 < index < len(parts) - 1:
            spans.append([len(tokens), len(tokens) + len(piece)])
        tokens += piece
    return tokens, spans


def scenario() -> list[tuple[str, list[int], list[list[int]]]]:
    """(name, prompt, passage spans): one prompt that caches passages A, B, C, then prompts that
    reuse them elsewhere, in other orders, behind other system lines; D, between two of them, was
    never seen."""
    a, b, c, d = (part(seed, PASSAGE_TOKENS) for seed in (2, 3, 4, 6))
    return [
        ("ingest", *build([part(1, SYSTEM_TOKENS), a, b, c, part(5, QUESTION_TOKENS)])),
        ("permuted", *build([part(7, SYSTEM_TOKENS), c, a, b, part(8, QUESTION_TOKENS)])),
        ("missed", *build([part(9, SYSTEM_TOKENS), a, d, b, part(10, QUESTION_TOKENS)])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug config (with extensions.blend); omit for vLLM alone")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from lmplug.integrations.vllm.lookup import LookupClient, socket_path

    engine_id = f"blend-{os.getpid()}"
    extra: dict[str, Any] = {}
    if args.lmplug:
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMPlugConnector", kv_role="kv_both", engine_id=engine_id,
            kv_connector_extra_config={"lmplug_config": args.lmplug},
        )  # fmt: skip
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
        max_model_len=4096, seed=0, **extra,
    )  # fmt: skip
    client = LookupClient(socket_path(engine_id)) if args.lmplug else None
    results: list[dict[str, Any]] = []
    for name, tokens, spans in scenario():
        params = SamplingParams(
            max_tokens=6, temperature=0, logprobs=3, detokenize=False,
            extra_args={"kv_transfer_params": {"lmplug": {"blend": {"segments": spans}}}},
        )  # fmt: skip
        out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        result: dict[str, Any] = {
            "name": name,
            "tokens": list(out.outputs[0].token_ids),
            "logprobs": [{str(t): v.logprob for t, v in step.items()} for step in out.outputs[0].logprobs or []],
        }
        llm.reset_prefix_cache()
        if client is not None:
            statistics = client.statistics()
            result["blend"] = statistics["extensions"]["blend"]
            result["transfers"] = statistics["transfers"]
            result["prefix_held"] = client.lookup(f"probe-{name}", tokens)
            client.release(f"probe-{name}")
        results.append(result)
    if client is not None:
        client.close()
    Path(args.out + ".part").write_text(json.dumps(results))
    os.replace(args.out + ".part", args.out)


if __name__ == "__main__":
    main()
