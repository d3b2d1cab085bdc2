"""The worker side of the connector: the cache itself, loads before the forward, saves after it."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from lmplug.core.config import LmplugConfig
from lmplug.core.sync import SyncCache
from lmplug.integrations.vllm.lookup import LookupServer, socket_path
from lmplug.integrations.vllm.paged import PagedLayout, Slots, layout_for
from lmplug.integrations.vllm.scheduler import LoadSpec, SaveSpec, StepPlan

logger = logging.getLogger("lmplug.vllm")
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


def _layer_order(name: str) -> tuple[int, str]:
    match = _LAYER_NUMBER.search(name)
    return (int(match.group(1)) if match else 0, name)


class WorkerSide:
    """Owns the lmplug cache in vLLM's worker process."""

    def __init__(self, config: LmplugConfig, engine_id: str, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.cache = SyncCache(config)
        self.cache.open()
        self.server = LookupServer(self.cache.cache, socket_path(engine_id))
        self.cache.start_background(self.server.serve)
        self.layers: list[torch.Tensor] = []
        self.layout: PagedLayout | None = None
        self.failed_blocks: set[int] = set()

    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_order)
        self.layers = [kv_caches[name] for name in names]
        model = self.config.model
        first = self.layers[0]
        name = "cpu" if first.device.type == "cpu" else ("flash" if first.shape[0] == 2 else "flashinfer")
        layout = layout_for(name, model.num_kv_heads, model.head_size, self.block_size)
        for layer in self.layers:
            layout.check(layer)
        self.layout = layout
        logger.info("lmplug: %d KV layers in vLLM's %r layout", len(self.layers), name)

    def _slots(self, block_ids: list[int], start: int, end: int) -> Slots:
        device = self.layers[0].device
        positions = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.tensor(block_ids, dtype=torch.int64)[positions // self.block_size]
        return Slots.of(blocks * self.block_size + positions % self.block_size, self.block_size, device)

    def load(self, plan: StepPlan) -> None:
        for spec in plan.loads:
            self._load(spec)
        if plan.releases:
            self.cache.run_sync(lambda: self._release(plan.releases))

    def _release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.server.release(request_id)

    def _load(self, spec: LoadSpec) -> None:
        assert self.layout is not None
        try:
            kv, count = self.cache.retrieve(spec.tokens[: spec.end])
        except Exception:
            logger.exception("lmplug load failed; vLLM recomputes")
            kv, count = torch.empty(0), 0
        finally:
            self.cache.run_sync(lambda: self.server.release(spec.request_id))
        loaded = min(count, spec.end)
        if loaded > spec.start:
            slots = self._slots(spec.block_ids, spec.start, loaded)
            self.layout.scatter(self.layers, slots, kv[:, :, spec.start : loaded])
        if loaded < spec.end:
            # Promised but not delivered (evicted, failed): vLLM recomputes these blocks.
            first = max(loaded, spec.start) // self.block_size
            last = (spec.end - 1) // self.block_size
            self.failed_blocks.update(spec.block_ids[first : last + 1])

    def save(self, plan: StepPlan) -> None:
        for spec in plan.saves:
            self._save(spec)

    def _save(self, spec: SaveSpec) -> None:
        assert self.layout is not None
        model = self.config.model
        kv = torch.empty(
            (2, model.num_layers, spec.end - spec.start, model.num_kv_heads * model.head_size),
            dtype=self.layers[0].dtype,
            device=self.layers[0].device,
        )
        self.layout.gather(self.layers, self._slots(spec.block_ids, spec.start, spec.end), kv)
        try:
            self.cache.store(spec.tokens, kv, start=spec.start)
        except Exception:
            logger.exception("lmplug save failed; serving continues without it")

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    def close(self) -> None:
        """Stop the lookup channel (its task is cancelled with the cache) and close the cache."""
        self.cache.close()
