"""Rotary position embedding (RoPE) arithmetic for KV that moves to another position.

RoPE rotates each pair of a key's dimensions by an angle proportional to the token's
position, so attention scores depend on relative positions only. A key computed at
position ``s`` therefore becomes the key of position ``s + d`` by one more rotation of
``d`` (CacheBlend's appendix A). lmplug-blend stores a passage's K rotated back to origin
0 (``d = -s``) and rotates it forward to wherever the passage appears next.

The angles come from the model's own RoPE (its frequencies, scaling and attention factor),
as a function ``cos_sin(positions)``; the rotation is done in float32 with one rounding to
the cache dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CosSin = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``positions`` (int64 ``[n]``, possibly negative) -> ``(cos, sin)``, each float32 ``[n, rotary_dim / 2]``."""


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """How a model rotates its keys.

    ``neox``: the pairs are ``(x[i], x[i + rotary_dim/2])`` (GPT-NeoX, Llama); otherwise
    ``(x[2i], x[2i+1])`` (GPT-J). Only the first ``rotary_dim`` of ``head_size`` dimensions
    rotate. ``cos_sin`` gives the angles; an ``mscale`` the model multiplies into them
    (YaRN and long-RoPE's attention factor) is taken out, so a rotation stays a rotation.
    """

    head_size: int
    rotary_dim: int
    neox: bool
    cos_sin: CosSin

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_size:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and within head_size {self.head_size}")


def inverse_frequency_angles(inv_freq: torch.Tensor) -> CosSin:
    """``cos_sin`` for plain RoPE with frequencies ``inv_freq`` (float32 ``[rotary_dim / 2]``)."""
    frequencies = inv_freq.detach().to(torch.float64)

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 angles: position * frequency stays exact enough at any position.
        angles = positions.to(torch.float64)[:, None] * frequencies.to(positions.device)[None, :]
        return angles.cos().float(), angles.sin().float()

    return cos_sin


def cached_angles(cos_sin_cache: torch.Tensor) -> CosSin:
    """``cos_sin`` from a table ``[max_positions, rotary_dim]`` of ``cat(cos, sin)`` rows (vLLM's
    ``rotary_emb.cos_sin_cache``). Negative positions use ``cos(-a) = cos(a)``, ``sin(-a) = -sin(a)``."""
    table = cos_sin_cache.detach().float()
    half = table.shape[-1] // 2
    norm = (table[:, :half].square() + table[:, half:].square()).sqrt()
    table = torch.cat([table[:, :half] / norm, table[:, half:] / norm], dim=-1)  # take out any mscale

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        magnitude = positions.abs()
        if magnitude.numel() and int(magnitude.max()) >= table.shape[0]:
            raise ValueError(f"a rotation by {int(magnitude.max())} positions is beyond the model's {table.shape[0]}")
        rows = table.to(positions.device)[magnitude]
        sign = torch.where(positions < 0, -1.0, 1.0).to(rows.device)[:, None]
        return rows[:, :half], rows[:, half:] * sign

    return cos_sin


def rotate(keys: torch.Tensor, delta: torch.Tensor | int, spec: RopeSpec) -> torch.Tensor:
    """``keys`` ``[..., heads, head_size]`` rotated by ``delta`` positions (an int for every key, or an
    int64 tensor of the leading shape of ``keys``, one per key), as a new tensor of ``keys``' dtype
    (float32 arithmetic, one rounding)."""
    if keys.dim() < 2 or keys.shape[-1] != spec.head_size:
        raise ValueError(f"keys {list(keys.shape)} do not end in heads and head_size {spec.head_size}")
    lead = keys.shape[:-2]
    if isinstance(delta, int):
        cos, sin = spec.cos_sin(torch.tensor([delta], dtype=torch.int64))
        cos, sin = cos[0], sin[0]  # one angle per frequency, for every key
    else:
        if tuple(delta.shape) != tuple(lead):
            raise ValueError(f"keys {list(keys.shape)} and delta {list(delta.shape)} do not match")
        cos, sin = spec.cos_sin(delta.reshape(-1).to(torch.int64))
        cos, sin = cos.view(*lead, 1, -1), sin.view(*lead, 1, -1)
    cos, sin = cos.to(keys.device), sin.to(keys.device)
    half = spec.rotary_dim // 2
    rotary = keys[..., : spec.rotary_dim]
    if spec.neox:
        first, second = rotary[..., :half].float(), rotary[..., half:].float()
    else:
        first, second = rotary[..., 0::2].float(), rotary[..., 1::2].float()
    out = torch.empty_like(keys)
    if spec.rotary_dim < spec.head_size:
        out[..., spec.rotary_dim :] = keys[..., spec.rotary_dim :]
    if spec.neox:
        out[..., :half] = first * cos - second * sin
        out[..., half : spec.rotary_dim] = second * cos + first * sin
    else:
        out[..., 0 : spec.rotary_dim : 2] = first * cos - second * sin
        out[..., 1 : spec.rotary_dim : 2] = second * cos + first * sin
    return out
