"""The worker side of the connector: the cache itself, loads before the forward, saves after it."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lmplug.core.config import LmplugConfig
from lmplug.core.layout import KVLayout
from lmplug.core.memory import IO_ALIGNMENT, empty_kv
from lmplug.core.sync import SyncCache
from lmplug.integrations.vllm.lookup import LookupServer, socket_path
from lmplug.integrations.vllm.paged import PagedLayout, Slots, layout_for
from lmplug.integrations.vllm.scheduler import LoadSpec, SaveSpec, StepPlan

logger = logging.getLogger("lmplug.vllm")
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


def _layer_order(name: str) -> tuple[int, str]:
    match = _LAYER_NUMBER.search(name)
    return (int(match.group(1)) if match else 0, name)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(slots=True)
class TransferCounters:
    """What the connector moved between lmplug and vLLM's KV cache, and the time it took."""

    loaded_bytes: int = 0
    load_seconds: float = 0.0
    saved_bytes: int = 0
    save_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"transfers": dataclasses.asdict(self)}


@dataclass(slots=True)
class _Load:
    """KV fetched for one request, waiting to be written into vLLM's blocks layer by layer."""

    slots: Slots
    kv: torch.Tensor  # [2, layers, n, hidden], on the KV cache's device
    block_ids: list[int]


class WorkerSide:
    """Owns the lmplug cache in vLLM's worker process.

    Loads are layer-wise: ``start_load`` fetches every request's KV from lmplug before the
    forward; each attention layer then waits only for its own layer
    (``wait_for_layer``). On CUDA the host-to-device copies and scatters of all layers are
    queued at once on a side stream, with an event per layer, so layer ``i`` computes while
    later layers still load. On the CPU a layer is scattered when its attention asks for it.
    Saves are gathered layer by layer as attention finishes with each one (``save_layer``)
    and stored after the forward (``save``).
    """

    def __init__(self, config: LmplugConfig, engine_id: str, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.cache = SyncCache(config)
        self.cache.open()
        self.transfers = TransferCounters()
        self.server = LookupServer(self.cache.cache, socket_path(engine_id), self.transfers.as_dict)
        self.cache.start_background(self.server.serve)
        self.layers: list[torch.Tensor] = []
        self.index: dict[str, int] = {}
        self.layout: PagedLayout | None = None
        self.failed_blocks: set[int] = set()
        self._loads: list[_Load] = []
        self._loaded: list[bool] = []
        self._stream: torch.cuda.Stream | None = None
        self._events: list[torch.cuda.Event] = []
        self._saves: list[tuple[SaveSpec, Slots, torch.Tensor]] | None = None
        self._saved: list[bool] = []
        self._warned_unloaded = False
        self._buffers: dict[str, torch.Tensor] = {}

    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_order)
        self.layers = [kv_caches[name] for name in names]
        self.index = {name: position for position, name in enumerate(names)}
        model = self.config.model
        first = self.layers[0]
        name = "cpu" if first.device.type == "cpu" else ("flash" if first.shape[0] == 2 else "flashinfer")
        layout = layout_for(name, model.num_kv_heads, model.head_size, self.block_size)
        for layer in self.layers:
            layout.check(layer)
        self.layout = layout
        if first.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=first.device)  # type: ignore[no-untyped-call]
            self._events = [torch.cuda.Event() for _ in self.layers]  # type: ignore[no-untyped-call]
        logger.info("lmplug: %d KV layers in vLLM's %r layout", len(self.layers), name)

    def _slots(self, block_ids: list[int], start: int, end: int) -> Slots:
        device = self.layers[0].device
        positions = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.tensor(block_ids, dtype=torch.int64)[positions // self.block_size]
        return Slots.of(blocks * self.block_size + positions % self.block_size, self.block_size, device)

    # ------------------------------------------------------------------ loads

    def start_load(self, plan: StepPlan) -> None:
        """Fetch the step's promised KV from lmplug; queue the per-layer copies on CUDA."""
        self._loads = []
        if plan.loads:
            step = self._aligned_tokens()
            staging = self._staging("load", sum(_round_up(spec.end, step) for spec in plan.loads))
            offset = 0
            for spec in plan.loads:
                load = self._fetch(spec, staging.narrow(2, offset, spec.end))
                offset += _round_up(spec.end, step)  # each request's KV starts on a 4 KiB boundary
                if load is not None:
                    self._loads.append(load)
        self._loaded = [False] * len(self.layers)
        if plan.releases:
            self.cache.run_sync(lambda: self._release(plan.releases))
        stream = self._stream
        if not self._loads or stream is None:
            return
        assert self.layout is not None
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for position, layer in enumerate(self.layers):
                for load in self._loads:
                    self.layout.scatter_layer(layer, load.slots, load.kv[:, position])
                self._events[position].record(stream)

    def wait_for_layer(self, layer_name: str) -> None:
        """Called before ``layer_name``'s attention runs: its loaded KV must be in place."""
        position = self.index.get(layer_name)
        if not self._loads or position is None or self._loaded[position]:
            return
        self._loaded[position] = True
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._events[position])
            return
        assert self.layout is not None
        started = time.perf_counter()
        for load in self._loads:
            self.layout.scatter_layer(self.layers[position], load.slots, load.kv[:, position])
        self.transfers.load_seconds += time.perf_counter() - started

    def _finish_loads(self) -> None:
        """After the forward: any layer whose attention never waited for its KV was computed
        without it, so its blocks are reported for recompute (never served wrong)."""
        loads, self._loads = self._loads, []
        if not loads:
            return
        if self._stream is not None:
            self._stream.synchronize()  # the host buffers may be dropped now
        if all(self._loaded):
            return
        if not self._warned_unloaded:
            self._warned_unloaded = True
            logger.warning(
                "lmplug: vLLM ran %d attention layers without asking for their loaded KV; "
                "those requests are recomputed",
                self._loaded.count(False),
            )
        for load in loads:
            self.failed_blocks.update(load.block_ids)

    def _release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.server.release(request_id)

    def _aligned_tokens(self) -> int:
        """Tokens whose KV rows fill whole 4 KiB blocks (1 on CUDA, where alignment buys nothing)."""
        first = self.layers[0]
        if first.device.type != "cpu":
            return 1
        model = self.config.model
        row = model.num_kv_heads * model.head_size * first.element_size()
        return IO_ALIGNMENT // math.gcd(IO_ALIGNMENT, row)

    def _staging(self, purpose: str, tokens: int) -> torch.Tensor:
        """A reusable ``[2, layers, >= tokens, hidden]`` buffer on the KV cache's device (no page
        faults per step). On the CPU it is 4 KiB-aligned, its rows too, so that a disk tier can
        read straight into it with O_DIRECT."""
        buffer = self._buffers.get(purpose)
        if buffer is None or buffer.shape[2] < tokens:
            model = self.config.model
            first = self.layers[0]
            capacity = _round_up(max(tokens, 2 * buffer.shape[2] if buffer is not None else 0), self._aligned_tokens())
            layout = KVLayout(len(self.layers), model.num_kv_heads, model.head_size, first.dtype)
            # vLLM calls in under inference mode; the cache writes into this buffer from its own
            # thread, which an inference tensor would refuse.
            with torch.inference_mode(mode=False):
                if first.device.type == "cpu":
                    buffer = empty_kv(layout, capacity)
                else:
                    buffer = torch.empty(layout.shape(capacity), dtype=first.dtype, device=first.device)
                self._buffers[purpose] = buffer
        return buffer

    def _fetch(self, spec: LoadSpec, out: torch.Tensor) -> _Load | None:
        started = time.perf_counter()
        try:
            return self._fetch_timed(spec, out)
        finally:
            self.transfers.load_seconds += time.perf_counter() - started

    def _fetch_timed(self, spec: LoadSpec, out: torch.Tensor) -> _Load | None:
        try:
            # Straight into the staging buffer: on CUDA that is device memory (one host-to-device copy).
            kv, count = self.cache.retrieve(spec.tokens[: spec.end], out=out)
        except Exception:
            logger.exception("lmplug load failed; vLLM recomputes")
            kv, count = torch.empty(0), 0
        finally:
            self.cache.run_sync(lambda: self.server.release(spec.request_id))
        loaded = min(count, spec.end)
        if loaded < spec.end:
            # Promised but not delivered (evicted, failed): vLLM recomputes these blocks.
            first = max(loaded, spec.start) // self.block_size
            last = (spec.end - 1) // self.block_size
            self.failed_blocks.update(spec.block_ids[first : last + 1])
        if loaded <= spec.start:
            return None
        part = kv[:, :, spec.start : loaded]
        self.transfers.loaded_bytes += part.numel() * part.element_size()
        blocks = spec.block_ids[spec.start // self.block_size : (loaded - 1) // self.block_size + 1]
        return _Load(self._slots(spec.block_ids, spec.start, loaded), part, blocks)

    # ------------------------------------------------------------------ saves

    def _save_buffers(self, plan: StepPlan) -> list[tuple[SaveSpec, Slots, torch.Tensor]]:
        if self._saves is None:
            staging = self._staging("save", sum(spec.end - spec.start for spec in plan.saves))
            self._saves = []
            offset = 0
            for spec in plan.saves:
                kv = staging.narrow(2, offset, spec.end - spec.start)
                offset += spec.end - spec.start
                self._saves.append((spec, self._slots(spec.block_ids, spec.start, spec.end), kv))
            self._saved = [False] * len(self.layers)
        return self._saves

    def save_layer(self, layer_name: str, plan: StepPlan) -> None:
        """Called after ``layer_name``'s attention: gather this layer's newly computed KV."""
        position = self.index.get(layer_name)
        if not plan.saves or position is None:
            return
        assert self.layout is not None
        started = time.perf_counter()
        for _, slots, kv in self._save_buffers(plan):
            self.layout.gather_layer(self.layers[position], slots, kv[:, position])
        self._saved[position] = True
        self.transfers.save_seconds += time.perf_counter() - started

    def save(self, plan: StepPlan) -> None:
        """After the forward: gather what was not gathered layer by layer, then store it."""
        self._finish_loads()
        if not plan.saves:
            self._saves = None
            return
        assert self.layout is not None
        started = time.perf_counter()
        saves = self._save_buffers(plan)
        self._saves = None
        for position, layer in enumerate(self.layers):
            if not self._saved[position]:
                for _, slots, kv in saves:
                    self.layout.gather_layer(layer, slots, kv[:, position])
        for spec, _, kv in saves:
            try:
                self.cache.store(spec.tokens, kv, start=spec.start)
            except Exception:
                logger.exception("lmplug save failed; serving continues without it")
            self.transfers.saved_bytes += kv.numel() * kv.element_size()
        self.transfers.save_seconds += time.perf_counter() - started

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    def close(self) -> None:
        """Stop the lookup channel (its task is cancelled with the cache) and close the cache."""
        self.cache.close()
