"""Deterministic, prefix-dependent KV for tests, and small configurations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lmplug.core.keys import canonical_tokens
from lmplug.core.layout import DTYPES


def make_config(
    tiers: Sequence[Mapping[str, Any]] = ({"type": "cpu", "capacity": "4MiB"},),
    *,
    chunk_size: int = 16,
    num_layers: int = 2,
    num_kv_heads: int = 2,
    head_size: int = 4,
    dtype: str = "float32",
    **overrides: Any,
) -> dict[str, Any]:
    """A small config dict: 16-token chunks, ``[2, 2, tokens, 8]`` float32 KV, one cpu tier."""
    config: dict[str, Any] = {
        "chunk_size": chunk_size,
        "model": {
            "name": "lmplug-test",
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_size": head_size,
            "dtype": dtype,
        },
        "tiers": [dict(tier) for tier in tiers],
    }
    config.update(overrides)
    return config


def reference_kv(tokens: object, config: Mapping[str, Any]) -> torch.Tensor:
    """KV whose every value depends on the whole prefix up to its token, as real KV does.

    Two prompts that share a chunk's tokens but not its prefix get different KV for it, so a
    test can tell KV served for the wrong prefix from the right KV.
    """
    array = canonical_tokens(tokens).astype(np.int64)
    model = config["model"]
    layers, hidden = int(model["num_layers"]), int(model["num_kv_heads"]) * int(model["head_size"])
    positions = np.arange(array.size, dtype=np.int64)
    # A prefix hash: cumulative sum of position-weighted token ids, folded to stay exact in float.
    prefix = np.cumsum((array + 1) * (positions % 251 + 7)) % 65_521
    kv = np.empty((2, layers, array.size, hidden), dtype=np.float64)
    lanes = np.arange(2 * layers * hidden, dtype=np.int64).reshape(2, layers, 1, hidden)
    kv[...] = (prefix.reshape(1, 1, -1, 1) * 31 + lanes) % 251
    return torch.from_numpy(kv).to(DTYPES[str(model.get("dtype", "float32"))])
