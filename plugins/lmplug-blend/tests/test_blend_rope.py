"""Moving K by a rotation gives the K the model computes at the new position."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmplug_blend.adapters import TransformersLlamaAdapter
from lmplug_blend.rope import RopeSpec, cached_angles, inverse_frequency_angles, rotate
from lmplug_blend.segments import moved, to_origin

from blend_testing import tiny_llama


def direct(spec_dim: int, rotary_dim: int, neox: bool, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Textbook RoPE at absolute positions, the reference."""
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = positions.double()[:, None] * inv[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x = keys.double()
    rot = x[..., :rotary_dim]
    a, b = (rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]) if neox else (rot[..., 0::2], rot[..., 1::2])
    na, nb = a * cos - b * sin, b * cos + a * sin
    out = x.clone()
    if neox:
        out[..., : rotary_dim // 2], out[..., rotary_dim // 2 : rotary_dim] = na, nb
    else:
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = na, nb
    return out.float()


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [32, 16], ids=["full", "partial"])
@pytest.mark.parametrize("source", ["frequencies", "table"])
def test_moving_a_key_equals_rotating_it_at_its_new_position(neox: bool, rotary_dim: int, source: str) -> None:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    if source == "frequencies":
        cos_sin = inverse_frequency_angles(inv)
    else:  # vLLM's cos_sin_cache layout, with an attention factor baked in (YaRN's mscale)
        angles = torch.arange(4096, dtype=torch.float64)[:, None] * inv.double()[None, :]
        cos_sin = cached_angles(torch.cat([angles.cos(), angles.sin()], dim=-1).float() * 1.25)
    spec = RopeSpec(head_size=32, rotary_dim=rotary_dim, neox=neox, cos_sin=cos_sin)
    raw = torch.randn(50, 3, 32)
    old = torch.randint(0, 2000, (50,))
    new = torch.randint(0, 2000, (50,))
    at_old = direct(32, rotary_dim, neox, raw, old)
    # Back to the origin, then forward: the K computed at the new position.
    at_new = rotate(rotate(at_old, -old, spec), new, spec)
    torch.testing.assert_close(at_new, direct(32, rotary_dim, neox, raw, new), atol=1e-4, rtol=1e-4)
    # Unrotated dimensions never move.
    assert torch.equal(at_new[..., rotary_dim:], at_old[..., rotary_dim:])
    # bfloat16 K: one rounding at the end.
    moved_bf16 = rotate(at_old.bfloat16(), new - old, spec)
    assert moved_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(moved_bf16.float(), direct(32, rotary_dim, neox, raw, new), atol=0.05, rtol=0.02)


def test_a_table_refuses_positions_beyond_it() -> None:
    spec = RopeSpec(head_size=4, rotary_dim=4, neox=True, cos_sin=cached_angles(torch.ones(8, 4)))
    with pytest.raises(ValueError, match="beyond"):
        rotate(torch.zeros(1, 1, 4), torch.tensor([-9]), spec)


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}],
    ids=["plain", "llama3-scaled"],
)  # fmt: skip
def test_the_models_own_rope_moves_exactly(scaling: dict[str, Any] | None) -> None:
    # Llama-3's scaled RoPE (which LMCache re-rotates with unscaled frequencies) included.
    config: dict[str, Any] = {}
    if scaling is not None:
        config["rope_parameters"] = {"rope_theta": 500000.0, **scaling}
    model = tiny_llama(**config)
    adapter = TransformersLlamaAdapter(model)
    stream = torch.randn(40, model.config.hidden_size)
    at_100 = adapter.attention_inputs(0, stream, torch.arange(100, 140))[1]
    at_900 = adapter.attention_inputs(0, stream, torch.arange(900, 940))[1]
    canonical = to_origin(at_100[None], 100, adapter.rope)
    torch.testing.assert_close(moved(canonical, 900, adapter.rope)[0], at_900, atol=1e-4, rtol=1e-4)
    at_0 = adapter.attention_inputs(0, stream, torch.arange(40))[1]
    torch.testing.assert_close(canonical[0], at_0, atol=1e-4, rtol=1e-4)
