"""The KV layout of a chunk, and validation of the KV tensors an engine hands in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmplug.core.config import ModelConfig
from lmplug.errors import KVDtypeError, KVShapeError, TokenCountMismatch

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """KV of ``n`` tokens is a tensor ``[2, num_layers, n, num_kv_heads * head_size]``."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    hidden_size: int = field(init=False, repr=False)
    bytes_per_token: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Derived once: both sit on the per-chunk hot path.
        hidden = self.num_kv_heads * self.head_size
        object.__setattr__(self, "hidden_size", hidden)
        object.__setattr__(self, "bytes_per_token", 2 * self.num_layers * hidden * self.dtype.itemsize)

    @classmethod
    def from_model(cls, model: ModelConfig) -> KVLayout:
        return cls(model.num_layers, model.num_kv_heads, model.head_size, DTYPES[model.dtype])

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        return (2, self.num_layers, num_tokens, self.hidden_size)

    def nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def describe(self) -> str:
        return (
            f"[2, layers={self.num_layers}, tokens, kv_heads*head_size={self.num_kv_heads}*{self.head_size}] "
            f"{str(self.dtype).removeprefix('torch.')}"
        )

    def check(self, kv: object, num_tokens: int) -> torch.Tensor:
        """Return ``kv`` if it is this layout's KV for ``num_tokens`` tokens; raise otherwise."""
        if not isinstance(kv, torch.Tensor):
            raise KVShapeError(f"KV must be a torch.Tensor, not {type(kv).__name__}")
        if kv.dtype != self.dtype:
            raise KVDtypeError(f"KV dtype is {kv.dtype}, the configured layout is {self.describe()}")
        if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != self.num_layers or kv.shape[3] != self.hidden_size:
            raise KVShapeError(f"KV shape is {list(kv.shape)}, the configured layout is {self.describe()}")
        if kv.shape[2] != num_tokens:
            raise TokenCountMismatch(f"KV covers {kv.shape[2]} tokens but {num_tokens} tokens were given")
        return kv
