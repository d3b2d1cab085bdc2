"""A random-weight Llama-architecture model built from code, for tests, the demo and benchmarks.

Nothing is downloaded: the config and seeded random weights are written with
``transformers`` as a local model directory that vLLM loads like any other. Prompts are
token ids (vLLM runs with ``skip_tokenizer_init``), so no tokenizer is needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelSize:
    """Geometry of a generated model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 8000
    max_position_embeddings: int = 32768

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


SIZES = {
    # 4 layers, 2 KV heads of 64: 2 KiB of bfloat16 KV per token; loads in seconds.
    "tiny": ModelSize(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2),
    # Prefill long enough on a CPU for cache effects to show (about 1.5 s for 2k tokens on one
    # core), short enough to benchmark 16k contexts: 8 layers, 4 KV heads of 64, 8 KiB of KV per token.
    "bench": ModelSize(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4),
}  # fmt: skip


def build_model(directory: Path, size: str = "tiny", *, seed: int = 0) -> Path:
    """Write the ``size`` model to ``directory`` (kept if already built with the same geometry)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    geometry = SIZES[size]
    stamp = directory / "lmplug-model.json"
    wanted = {"size": size, "seed": seed, **asdict(geometry)}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**asdict(geometry), tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call, arg-type]
    model.save_pretrained(directory, safe_serialization=True)
    stamp.write_text(json.dumps(wanted))
    return directory


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a random-weight Llama model for lmplug's tests and demo")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    print(build_model(args.directory, args.size))


if __name__ == "__main__":
    main()
