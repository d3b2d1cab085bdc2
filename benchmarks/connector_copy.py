"""The vLLM connector's copies alone: lmplug's chunks into vLLM's CPU KV cache and back, vs memcpy.

What the connector does per layer, on tensors of vLLM's CPU layout with the ``bench`` model's
geometry (8 layers, 4 KV heads of 64, bfloat16, 128-token blocks), a 3072-token prompt (24
blocks, 24 MiB of KV) in blocks spread over a larger cache:

- load: chunk-layout KV into the blocks as the worker loads it: through vLLM's own CPU KV
  writer (``cpu_attn_reshape_and_cache``, the kernel its attention inserts KV with) for the
  ``amx`` layout, by lmplug's scatter (:meth:`PagedLayout.scatter_placed`) for ``vec``, whichever
  is faster for the layout (``PagedLayout.loads_through_writer``); where that is vLLM's writer,
  an info row times lmplug's scatter as well;
- save: the worker's gather (:meth:`PagedLayout.gather_placed`) of the same blocks into a
  chunk-layout buffer, in the layout vLLM's writer uses for the ISA (found the way the worker
  finds it, by :func:`detect_cpu_layout`);
- reference: ``dst.copy_(src)`` of the same bytes between contiguous tensors.

lmplug's scatter and gather move whole blocks through compiled kernels
(:mod:`lmplug.integrations.vllm.cpu_kernels`) where numba is installed, as it is with vLLM.

One row pair per ISA this CPU runs: ``vec`` always, ``amx`` (vLLM's choice for bfloat16 on CPUs
with AMX tiles, where K and V are tiled) when the CPU has AMX. Each sample rotates over enough
prompts to move 128 MiB, so all copies run from DRAM. Every load and save is checked against
the source, outside the timed section. No vLLM engine runs: ``vllm_chat`` measures the same
copies inside vLLM, where the forward runs beside them. Needs vLLM's CPU build (skipped with a
note without it).

Target: load and save each at >= 0.5x memcpy.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.harness import GiB, MiB, Result, Settings, Target, sample_sync
from lmplug.integrations.vllm.paged import CpuWriter, Placement, detect_cpu_layout, slot_tensor

NAME = "connector_copy"
SUMMARY = "vLLM connector load/save copies (CPU layouts) vs same-run memcpy (target >= 0.5x)"

LAYERS, HEADS, HEAD_SIZE, BLOCK = 8, 4, 64, 128
TOKENS = 3072
TARGET = Target(">=", 0.5, relative=True)
WORKING_SET = 128 * MiB


def _writer_op() -> Any:
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels)

        return torch.ops._C.cpu_attn_reshape_and_cache
    except (ImportError, AttributeError, RuntimeError):
        return None


def _isas() -> list[str]:
    return ["vec", "amx"] if torch.cpu._is_amx_tile_supported() else ["vec"]


def _measure(isa: str, op: Any, settings: Settings) -> list[Result]:
    writer = CpuWriter(op, isa, HEADS, HEAD_SIZE, BLOCK)
    layout = detect_cpu_layout(writer, torch.bfloat16)
    tokens = TOKENS // 4 if settings.quick else TOKENS
    count = tokens // BLOCK
    kv_bytes = 2 * LAYERS * tokens * HEADS * HEAD_SIZE * 2
    prompts = max(1, -(-(WORKING_SET // 4 if settings.quick else WORKING_SET) // kv_bytes))
    cache_blocks = 3 * count * prompts
    # vLLM allocates one tensor per layer; blocks of each prompt are spread (every third block).
    layers = [torch.zeros(layout.cache_shape(cache_blocks), dtype=torch.bfloat16) for _ in range(LAYERS)]
    sources = [torch.randn(2, LAYERS, tokens, HEADS * HEAD_SIZE).to(torch.bfloat16) for _ in range(prompts)]
    outs = [torch.zeros_like(source) for source in sources]
    block_ids = [list(range(index * 3 * count, (index + 1) * 3 * count, 3)) for index in range(prompts)]
    cpu = torch.device("cpu")
    placements = [Placement.of(ids, 0, tokens, BLOCK, cpu) for ids in block_ids]
    slots = [slot_tensor(ids, 0, tokens, BLOCK) for ids in block_ids]
    flat_sources = [source.view(-1) for source in sources]
    flat_outs = [out.view(-1) for out in outs]

    def load() -> float:
        return write() if layout.loads_through_writer else scatter()

    def write() -> float:
        started = time.perf_counter()
        for source, slot in zip(sources, slots, strict=True):
            for position, layer in enumerate(layers):
                writer.write(layer, slot, source[:, position])
        return (time.perf_counter() - started) / prompts

    def scatter() -> float:
        started = time.perf_counter()
        for source, placement in zip(sources, placements, strict=True):
            for position, layer in enumerate(layers):
                layout.scatter_placed(layer, placement, source[:, position])
        return (time.perf_counter() - started) / prompts

    def save() -> float:
        started = time.perf_counter()
        for out, placement in zip(outs, placements, strict=True):
            for position, layer in enumerate(layers):
                layout.gather_placed(layer, placement, out[:, position])
        return (time.perf_counter() - started) / prompts

    def memcpy() -> float:
        started = time.perf_counter()
        for out, source in zip(flat_outs, flat_sources, strict=True):
            out.copy_(source)
        return (time.perf_counter() - started) / prompts

    cases = {"memcpy": memcpy, "load": load, "save": save}
    if layout.loads_through_writer:
        cases["scatter"] = scatter
    stats = sample_sync(cases, settings)
    for out in outs:
        out.zero_()
    save()  # the last load (or scatter) wrote every prompt: what comes back must be the source
    for out, source in zip(outs, sources, strict=True):
        if not torch.equal(out, source):
            raise RuntimeError(f"{isa}: the KV gathered back is not the KV loaded")
    to_gib = kv_bytes / GiB
    reference = stats["memcpy"].inverted(to_gib)
    label = f"{tokens} tokens, ISA {isa} ({layout.name} layout)"
    how = "vLLM's writer" if layout.loads_through_writer else "scatter"
    results = [
        Result(NAME, f"load ({how}) {label}", "GiB/s", stats["load"].inverted(to_gib), TARGET, reference, "memcpy"),
        Result(NAME, f"save (gather) {label}", "GiB/s", stats["save"].inverted(to_gib), TARGET, reference, "memcpy"),
    ]  # fmt: skip
    if "scatter" in stats:  # what loads would take through lmplug's own scatter
        scattered = stats["scatter"].inverted(to_gib)
        results.append(Result(NAME, f"load (scatter, unused) {label}", "GiB/s", scattered, None, reference, "memcpy"))
    return results


def run(settings: Settings) -> list[Result]:
    op = _writer_op()
    if op is None:
        print("connector_copy: skipped, vLLM's CPU kernels are not installed", flush=True)
        return []
    results: list[Result] = []
    for isa in _isas():
        results += _measure(isa, op, settings)
    return results
