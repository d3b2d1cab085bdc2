"""A small random-weight Llama (float32, so that exactness is checked tightly), and passages for it."""

from __future__ import annotations

from typing import Any

import torch

LAYERS, HEADS, KV_HEADS, HEAD_SIZE, VOCAB = 4, 4, 2, 32, 500


def tiny_llama(**config: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HEADS * HEAD_SIZE,
        "intermediate_size": 256,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    }
    settings.update(config)
    torch.manual_seed(1234)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def passage(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=generator).tolist()
