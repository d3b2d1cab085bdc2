"""What the executor needs of a model, and the adapter for transformers' Llama family.

The executor (:mod:`lmplug_blend.executor`) runs a decoder layer by layer over any subset of
a prompt's tokens; everything specific to a model family is behind :class:`BlendAdapter`.
The model's hidden state is handled as one residual stream (``x + attention``, then ``x +
mlp``), so fused norms that update a residual in place are never handed a tensor twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmplug_blend.rope import RopeSpec, inverse_frequency_angles


@dataclass(frozen=True, slots=True)
class Geometry:
    """A decoder's attention shape."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    window: int | None = None  # sliding window, in tokens


class BlendAdapter(Protocol):
    """One model, seen as the executor needs it. Tensors are per token (no batch dimension)."""

    geometry: Geometry
    rope: RopeSpec

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream ``[n, hidden]`` entering layer 0 for token ids ``[n]``."""
        ...

    def attention_inputs(
        self, layer: int, stream: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [n, heads, head_size]``, ``k``, ``v [n, kv_heads, head_size]`` of ``layer`` for the stream
        rows at ``positions`` (norms and projections applied, q and k rotated). ``stream`` is not changed."""
        ...

    def after_attention(self, layer: int, stream: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The stream leaving ``layer``, from the stream entering it and the attention output
        ``[n, heads * head_size]`` (output projection, residual, MLP)."""
        ...


class UnsupportedModel(ValueError):
    """The model is not one lmplug-blend can blend (it says which part is missing)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TransformersLlamaAdapter:
    """transformers' ``LlamaForCausalLM`` and the models built like it (Mistral, Qwen2 with its
    biases). Found by structure, not by class name; anything else is :class:`UnsupportedModel`."""

    def __init__(self, model: Any) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        needed = ("embed_tokens", "rotary_emb")
        if inner is None or layers is None or any(not hasattr(inner, name) for name in needed):
            raise UnsupportedModel(f"{type(model).__name__} has no model.layers, embed_tokens and rotary_emb")
        attention = layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attention, name):
                raise UnsupportedModel(f"{type(model).__name__}'s attention has no {name}")
        if hasattr(attention, "q_norm"):
            raise UnsupportedModel(f"{type(model).__name__} normalizes q and k per head (Qwen3): not adapted yet")
        config = model.config
        rope_type = getattr(inner.rotary_emb, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            # Their frequencies change with the sequence's length: KV moved by a rotation would not match.
            raise UnsupportedModel(f"RoPE type {rope_type!r} changes with the sequence length: not supported")
        self.model = model
        self._inner = inner
        self._layers = layers
        head_size = int(attention.head_dim)
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.geometry = Geometry(
            num_layers=len(layers),
            num_heads=int(config.num_attention_heads),
            num_kv_heads=int(config.num_key_value_heads),
            head_size=head_size,
            scale=float(attention.scaling),
            window=int(window) if window else None,
        )
        inv_freq = inner.rotary_emb.inv_freq
        self.rope = RopeSpec(
            head_size=head_size,
            rotary_dim=2 * int(inv_freq.shape[0]),
            neox=True,
            cos_sin=inverse_frequency_angles(inv_freq.float()),
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        embedded: torch.Tensor = self._inner.embed_tokens(ids)
        return embedded

    def attention_inputs(
        self, layer: int, stream: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self._layers[layer]
        attention = block.self_attn
        x = block.input_layernorm(stream)
        n, size = x.shape[0], self.geometry.head_size
        q = attention.q_proj(x).view(n, -1, size)
        k = attention.k_proj(x).view(n, -1, size)
        v = attention.v_proj(x).view(n, -1, size)
        cos, sin = self._inner.rotary_emb(x[None], positions[None])  # [1, n, rotary_dim]
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        rotary = self.rope.rotary_dim
        q = torch.cat([q[..., :rotary] * cos + _rotate_half(q[..., :rotary]) * sin, q[..., rotary:]], dim=-1)
        k = torch.cat([k[..., :rotary] * cos + _rotate_half(k[..., :rotary]) * sin, k[..., rotary:]], dim=-1)
        return q.to(stream.dtype), k.to(stream.dtype), v

    def after_attention(self, layer: int, stream: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        block = self._layers[layer]
        stream = stream + block.self_attn.o_proj(attended)
        out: torch.Tensor = stream + block.mlp(block.post_attention_layernorm(stream))
        return out
