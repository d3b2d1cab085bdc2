"""vLLM's own CPU attention over a request's blocks, for queries at chosen positions (what CacheBlend
recomputes), against plain masked attention over the same KV."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmplug.integrations.vllm.attention import CpuPagedAttention
from lmplug.integrations.vllm.paged import CpuWriter, slot_tensor

pytest.importorskip("vllm", reason="vLLM is not installed")

HEADS, KV_HEADS, DIM, BLOCKS = 6, 2, 64, 24
AMX = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM's 'amx' kernels need a CPU with AMX")


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    keys = torch.arange(k.shape[0])
    mask = keys[None, :] <= positions[:, None]
    if window is not None:
        mask &= keys[None, :] > positions[:, None] - window
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1),
        attn_mask=mask, scale=DIM**-0.5, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(0, 1).reshape(q.shape[0], -1)


@pytest.mark.parametrize(
    ("isa", "block"),
    [
        ("vec16", 16),
        ("vec", 32),
        ("vec", 64),
        pytest.param("amx", 32, marks=AMX),
    ],  # the block sizes vLLM pairs with each ISA
)
@pytest.mark.parametrize("window", [None, 40])
def test_each_query_sees_exactly_the_keys_up_to_its_position(isa: str, block: int, window: int | None) -> None:
    import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels)

    generator = torch.Generator().manual_seed(block)
    n = 7 * block + 5
    k = torch.randn(n, KV_HEADS, DIM, generator=generator).bfloat16()
    v = torch.randn(n, KV_HEADS, DIM, generator=generator).bfloat16()
    layer = torch.zeros(BLOCKS, KV_HEADS, block, 2 * DIM, dtype=torch.bfloat16)
    block_ids = [11, 3, 17, 0, 8, 21, 5, 14]
    writer = CpuWriter(torch.ops._C.cpu_attn_reshape_and_cache, isa, KV_HEADS, DIM, block)
    writer.write(layer, slot_tensor(block_ids, 0, n, block), torch.stack([k, v]).flatten(2))
    # Scattered queries and runs of consecutive ones (a run is one causal request to the kernel).
    positions = torch.tensor(sorted({0, 1, 2, 9, 30, 31, 32, 33, 60, 61, 2 * block + 1, n - 2, n - 1}))
    q = torch.randn(len(positions), HEADS, DIM, generator=generator).bfloat16()
    attention = CpuPagedAttention(isa, KV_HEADS, DIM, block)
    out = attention.attend(layer, block_ids, q, positions, DIM**-0.5, window)
    torch.testing.assert_close(out.float(), reference(q, k, v, positions, window), atol=2e-2, rtol=2e-2)
    # Every query alone gives the same answer: nothing leaks between runs.
    single = attention.attend(layer, block_ids, q[5:6], positions[5:6], DIM**-0.5, window)
    torch.testing.assert_close(single, out[5:6], atol=1e-2, rtol=1e-2)


def test_positions_must_increase_and_stay_inside_the_blocks() -> None:
    attention = CpuPagedAttention("vec", KV_HEADS, DIM, 16)
    layer = torch.zeros(BLOCKS, KV_HEADS, 16, 2 * DIM, dtype=torch.bfloat16)
    q = torch.zeros(2, HEADS, DIM, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="increase"):
        attention.attend(layer, [0, 1], q, torch.tensor([5, 3]), 1.0)
    with pytest.raises(ValueError, match="beyond"):
        attention.attend(layer, [0, 1], q, torch.tensor([5, 40]), 1.0)
