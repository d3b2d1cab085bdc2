"""The adapter for vLLM's own Llama-family modules (the model the engine serves, no second copy).

vLLM fuses q, k and v into one projection and gate and up into another, and its norms add the
residual in place when given one; the adapter calls each module on fresh tensors, norms without
a residual, so nothing the engine owns is changed. Found by structure after unwrapping, not by
class name: vLLM's ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch

from lmplug_blend.adapters import Geometry, UnsupportedModel
from lmplug_blend.rope import RopeSpec, cached_angles


class VllmLlamaAdapter:
    """vLLM's Llama-family model, seen as :class:`lmplug_blend.adapters.BlendAdapter`."""

    def __init__(self, model: Any) -> None:
        name = type(model).__name__
        inner = getattr(model, "model", None)
        layers = list(getattr(inner, "layers", None) or ())
        if inner is None or not layers or not hasattr(inner, "embed_input_ids"):
            raise UnsupportedModel(f"{name} has no model.layers and model.embed_input_ids")
        if int(getattr(inner, "start_layer", 0)) != 0 or int(getattr(inner, "end_layer", len(layers))) != len(layers):
            raise UnsupportedModel(f"{name} is split across pipeline stages")
        first = layers[0]
        attention: Any = getattr(first, "self_attn", None)
        needed = ("qkv_proj", "o_proj", "rotary_emb", "q_size", "kv_size", "attn")
        missing = [part for part in needed if not hasattr(attention, part)]
        missing += [part for part in ("input_layernorm", "post_attention_layernorm", "mlp") if not hasattr(first, part)]
        if missing:
            raise UnsupportedModel(f"{name}'s decoder layers lack {', '.join(missing)}")
        if hasattr(attention, "q_norm"):
            raise UnsupportedModel(f"{name} normalizes q and k per head (Qwen3): not adapted yet")
        rotary = attention.rotary_emb
        if not hasattr(rotary, "cos_sin_cache") or not hasattr(rotary, "is_neox_style"):
            raise UnsupportedModel(f"{name}'s rotary embedding {type(rotary).__name__} has no cos_sin_cache")
        if type(rotary).__name__ in ("DynamicNTKScalingRotaryEmbedding", "Phi3LongRoPEScaledRotaryEmbedding"):
            raise UnsupportedModel(f"RoPE {type(rotary).__name__} changes with the sequence length: not supported")
        kernel = attention.attn
        self.model = model
        self._inner = inner
        self._layers = layers
        self._q_size, self._kv_size = int(attention.q_size), int(attention.kv_size)
        head_size = int(kernel.head_size)
        window = getattr(kernel, "sliding_window", None)
        self.geometry = Geometry(
            num_layers=len(layers),
            num_heads=int(kernel.num_heads),
            num_kv_heads=int(kernel.num_kv_heads),
            head_size=head_size,
            scale=float(attention.scaling),
            window=int(window) if window else None,
        )
        # The table in float32, as the model computed it (the engine may hold a bfloat16 copy).
        compute = getattr(rotary, "_compute_cos_sin_cache", None)
        table = compute() if callable(compute) else rotary.cos_sin_cache
        self.rope = RopeSpec(
            head_size=head_size,
            rotary_dim=int(getattr(rotary, "rotary_dim", head_size)),
            neox=bool(rotary.is_neox_style),
            cos_sin=cached_angles(table.float()),
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        embedded: torch.Tensor = self._inner.embed_input_ids(ids)
        return embedded

    def attention_inputs(
        self, layer: int, stream: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self._layers[layer]
        attention = block.self_attn
        x = block.input_layernorm(stream)  # without a residual: a new tensor
        qkv, _ = attention.qkv_proj(x)
        q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
        q, k = q.contiguous(), k.contiguous()
        q, k = attention.rotary_emb(positions, q, k)  # in place on these copies (vLLM's CPU kernel)
        n, size = stream.shape[0], self.geometry.head_size
        return q.view(n, -1, size), k.view(n, -1, size), v.contiguous().view(n, -1, size)

    def after_attention(self, layer: int, stream: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        block = self._layers[layer]
        projected, _ = block.self_attn.o_proj(attended)
        stream = stream + projected
        out: torch.Tensor = stream + block.mlp(block.post_attention_layernorm(stream))
        return out
