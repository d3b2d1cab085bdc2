"""One vLLM process for :mod:`benchmarks.vllm_ttft` (vLLM spawns workers, so it runs as a script).

    python -m benchmarks.vllm_engine MODEL OUT.json --contexts 2048,8192 --samples 3 [--lmplug CONFIG]

With ``--lmplug`` it measures, per context length, the TTFT of a unique prompt (a miss:
full prefill, then stored) and of the same prompt again after vLLM's own prefix cache is
reset (a hit: loaded from lmplug). With ``--own-cache`` (no connector) the second request
is served from vLLM's own prefix cache instead, which is not reset. Either way it measures
the throughput of a batch of unique prompts (all misses; ``--batch 0`` skips it), and with
lmplug reads the connector's transfer counters from the worker at the end.

Prompts are random token ids, or with ``--text`` English text (license texts and standard
library documentation) through the model's own tokenizer: each prompt starts at another
place of that text, so no two share a prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

from benchmarks.vllm_setup import connector, prepare_environment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug config file (omit for vLLM without a connector)")
    parser.add_argument("--contexts", default="", help="comma-separated prompt lengths for the TTFT rows")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="unique prompts in the throughput batch")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--batch-rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=16640)
    parser.add_argument("--own-cache", action="store_true", help="vLLM's prefix cache serves the second request")
    parser.add_argument("--text", action="store_true", help="prompts of real text (the model has a tokenizer)")
    args = parser.parse_args()
    prepare_environment(2)
    corpus = english_tokens(args.model) if args.text else []
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine_id = f"bench-{os.getpid()}"
    extra = connector(engine_id, args.lmplug if args.lmplug else None)
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        seed=0,
        enable_prefix_caching=args.own_cache,
        disable_log_stats=False,
        **extra,
    )
    rng = random.Random(1234)
    starts = iter(range(0, len(corpus), 211))

    def unique(length: int) -> list[int]:
        if not corpus:
            return [rng.randrange(10, 7990) for _ in range(length)]
        start = next(starts)
        if start + length > len(corpus):
            raise SystemExit(f"the text has {len(corpus)} tokens: too few for another {length}-token prompt")
        return corpus[start : start + length]

    def ttft(prompt: list[int]) -> float:
        params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
        (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return float(output.metrics.first_token_latency)  # type: ignore[union-attr]

    ttft(unique(512))  # warm-up
    report: dict[str, Any] = {"ttft": {}}
    for context in [int(c) for c in args.contexts.split(",") if c]:
        cold, hit = [], []
        for _ in range(args.samples):
            prompt = unique(context)
            cold.append(ttft(prompt))
            if not args.own_cache:
                llm.reset_prefix_cache()
            hit.append(ttft(prompt))
            llm.reset_prefix_cache()
        report["ttft"][str(context)] = {"cold": cold, "hit": hit}

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False)
    rates = []
    for _ in range(args.batch_rounds if args.batch else 0):
        prompts = [TokensPrompt(prompt_token_ids=unique(args.batch_tokens)) for _ in range(args.batch)]
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        rates.append(args.batch * (args.batch_tokens + 16) / (time.perf_counter() - started))
    report["throughput"] = rates
    if args.lmplug:
        from lmplug.integrations.vllm.lookup import LookupClient, socket_path

        time.sleep(0.5)
        client = LookupClient(socket_path(engine_id))
        report["worker"] = client.statistics()
        client.close()
    with open(args.out, "w") as handle:
        json.dump(report, handle)


def english_tokens(model: str) -> list[int]:
    """License texts and standard-library documentation, one text, as token ids of ``model``'s tokenizer."""
    import pydoc
    from pathlib import Path

    from transformers import AutoTokenizer

    licenses = Path("/usr/share/common-licenses")  # Debian's base-files
    texts = [path.read_text() for path in sorted(licenses.glob("*")) if path.is_file()] if licenses.is_dir() else []
    for name in ("argparse", "asyncio", "collections", "json", "os", "re", "typing", "unittest"):
        texts.append(pydoc.render_doc(name, renderer=pydoc.plaintext))  # type: ignore[attr-defined]
    tokens: list[int] = AutoTokenizer.from_pretrained(model)("\n\n".join(texts))["input_ids"]
    return tokens


if __name__ == "__main__":
    main()
