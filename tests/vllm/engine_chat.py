"""Two chat turns on a real model in one vLLM process, with another user's long request between
them; write what each turn generated as JSON.

    python tests/vllm/engine_chat.py MODEL_DIR OUT.json [--lmplug CONFIG.yaml]

Turn 2 is turn 1's prompt, its answer and a new question, so with lmplug (and vLLM's own
prefix cache off) its prefix, the answer included, can only come from lmplug; the request
between the turns takes over vLLM's blocks, so nothing of turn 1 is left in them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug config file (omit to run vLLM without a connector)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def chat(messages: list[dict[str, str]]) -> list[int]:
        ids: list[int] = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        return ids

    extra = {}
    if args.lmplug:
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMPlugConnector", kv_role="kv_both", engine_id=f"chat-{os.getpid()}",
            kv_connector_extra_config={"lmplug_config": args.lmplug},
        )  # fmt: skip
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=4096,
        seed=0, enable_prefix_caching=False, **extra,
    )  # fmt: skip
    # Few tokens: enough to tell a right answer from a wrong one, few chances of a near tie.
    params = SamplingParams(max_tokens=12, temperature=0, detokenize=False)

    def generate(prompt: list[int]) -> tuple[list[int], int]:
        (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return list(output.outputs[0].token_ids), int(output.num_cached_tokens or 0)

    first = chat([{"role": "user", "content": (LICENSES / "GPL-3").read_text()[:2500] + "\n\nWhat is this document?"}])
    answer, _ = generate(first)
    generate(chat([{"role": "user", "content": (LICENSES / "LGPL-2.1").read_text()[:15000] + "\n\nWhat is this?"}]))
    said = answer[:-1] if answer and answer[-1] == tokenizer.eos_token_id else answer
    follow_up = "<|im_end|>\n<|im_start|>user\nWho wrote it?<|im_end|>\n<|im_start|>assistant\n"
    second = first + said + tokenizer(follow_up, add_special_tokens=False)["input_ids"]
    reply, cached = generate(second)
    result = {"first": answer, "second": reply, "second_prompt": len(second), "second_cached": cached}
    result["texts"] = [tokenizer.decode(answer), tokenizer.decode(reply)]
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
