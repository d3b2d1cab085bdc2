"""The worker side of the connector: the cache itself, loads before the forward, saves after it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import cast

import anyio
import torch

from lmplug.core.config import LmplugConfig
from lmplug.core.extension import EngineExtension, EngineLoad, EngineSave
from lmplug.core.layout import KVLayout
from lmplug.core.memory import KVChunk, empty_kv
from lmplug.core.sync import SyncCache
from lmplug.errors import KVShapeError
from lmplug.integrations.vllm.attention import CpuPagedAttention
from lmplug.integrations.vllm.copier import Copier
from lmplug.integrations.vllm.lookup import LookupServer, socket_path
from lmplug.integrations.vllm.paged import (
    CpuLayout,
    CpuWriter,
    PagedLayout,
    Placement,
    detect_cpu_layout,
    layout_for,
    slot_tensor,
)
from lmplug.integrations.vllm.scheduler import Push, Span, StepPlan

logger = logging.getLogger("lmplug.vllm")
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


def _layer_order(name: str) -> tuple[int, str]:
    match = _LAYER_NUMBER.search(name)
    return (int(match.group(1)) if match else 0, name)


@dataclass(slots=True)
class TransferCounters:
    """What the connector moved between lmplug and vLLM's KV cache, and the time it took."""

    loaded_bytes: int = 0
    load_seconds: float = 0.0
    """Time spent moving loaded KV (in the copy thread on the CPU, overlapping the forward)."""
    load_wait_seconds: float = 0.0
    """Time the forward waited for loaded KV (what loads cost vLLM's critical path)."""
    saved_bytes: int = 0
    save_seconds: float = 0.0
    """Time spent gathering and storing saved KV."""
    save_wait_seconds: float = 0.0
    """Time the step waited for its saves after the forward."""
    pushes: int = 0
    """PD pushes started (a prefill's prompt KV sent to its decode instance)."""
    pushed_tokens: int = 0
    """Tokens the decode instances hold after those pushes."""
    short_pushes: int = 0
    """Pushes that delivered less than the prompt asked (dead, full or refusing decode; a timeout)."""
    extension_loads: int = 0
    """Requests whose tokens past the exact prefix an engine extension wrote (CacheBlend's blends)."""
    extension_load_failures: int = 0
    """Of those, the ones that failed: their tokens were recomputed."""
    extension_seconds: float = 0.0
    """Time the forward waited for extensions' loads and saves."""

    def statistics(self) -> dict[str, object]:
        """The counters, by name."""
        return dataclasses.asdict(self)


@dataclass(slots=True)
class _Piece:
    """Part of a request's loaded KV: ``kv`` ``[2, layers, n, hidden]`` (a leased chunk's tokens, or
    their copy on the KV cache's device) and where those tokens go in vLLM's blocks."""

    kv: torch.Tensor
    placement: Placement
    slots: torch.Tensor | None = None
    """Every token's slot, for vLLM's own CPU writer."""


@dataclass(slots=True)
class _Taken:
    """What one step took from the lookup server: the leased chunks of each load (with a reference
    each, released after the step) and what each lease covers."""

    chunks: dict[str, tuple[KVChunk, ...]]
    tokens: dict[str, int]
    loads: list[str]
    """The requests loaded this step: their leases go once the step is done."""


class WorkerSide:
    """Owns the lmplug cache in vLLM's worker process (one per tensor-parallel rank).

    Loads read the chunks that the scheduler's lookup leased (no second lookup, no staging
    copy on the CPU) and write them into vLLM's blocks layer by layer: each attention layer
    waits only for its own layer (``wait_for_layer``). Whole blocks are copied a block at a
    time. On CUDA the chunks are copied to the device and scattered on a side stream, with
    an event per layer, so layer ``i`` computes while later layers still load. Saves are
    gathered layer by layer as attention finishes with each one (``save_layer``) and stored
    after the forward (``save``), in one hand-off to the cache's loop.
    """

    def __init__(self, config: LmplugConfig, engine_id: str, block_size: int, rank: int = 0) -> None:
        self.config = config
        self.block_size = block_size
        self.rank = rank
        self.cache = SyncCache(config)
        self.cache.open()
        self.transfers = TransferCounters()
        try:
            built = self.cache.async_cache.plugins.build_engine_extensions(config.extensions)
        except BaseException:
            self.cache.close()
            raise
        self.extensions: dict[str, EngineExtension] = {extension.name: extension for extension in built}
        self.model: object | None = None
        """The engine's model module (for extensions that compute), when the connector found it."""
        self.server = LookupServer(
            self.cache.async_cache,
            socket_path(engine_id, rank),
            self._statistics,
            extensions=self.extensions,
        )
        self.cache.start_background(self.server.serve)
        self.layers: list[torch.Tensor] = []
        self.index: dict[str, int] = {}
        self.layout: PagedLayout | None = None
        self.writer: CpuWriter | None = None
        """vLLM's CPU KV writer, which loads go through on the CPU (None elsewhere)."""
        self.attention: CpuPagedAttention | None = None
        """vLLM's CPU attention over a request's blocks, for extensions that compute (None elsewhere)."""
        self.disabled: str | None = None
        """Why lmplug is off in this engine (vLLM's KV layout unknown), else None."""
        self.failed_blocks: set[int] = set()
        self.finished_saves: set[str] = set()
        self._loads: list[_Piece] = []
        self._load_blocks: list[int] = []
        self._loaded: list[bool] = []
        self._taken: _Taken | None = None
        self._stream: torch.cuda.Stream | None = None
        self._events: list[torch.cuda.Event] = []
        self._saves: list[tuple[Span, Placement, torch.Tensor]] | None = None
        self._saved: list[bool] = []
        self._warned_unloaded = False
        self._buffers: dict[str, torch.Tensor] = {}
        self._copier: Copier | None = None
        self._load_jobs: list[Future[object]] = []
        self._save_jobs: list[Future[object]] = []
        self._finishing: Future[object] | None = None
        """On the CPU, the copy thread's job that ends the last step's saves (see :meth:`before_step`)."""
        self._storing: list[Future[None] | None] = [None, None]
        """The store of each of the two save buffers' KV, which steps take in turn: a step's
        first gather waits for the store two steps back, not for the last one."""
        self._slot = 0
        self._finished_lock = threading.Lock()

    def _statistics(self) -> dict[str, object]:
        extensions: dict[str, object] = {}
        for name, extension in self.extensions.items():
            try:
                extensions[name] = extension.statistics()
            except Exception as exc:
                extensions[name] = {"error": str(exc)}
        return {"transfers": self.transfers.statistics(), "extensions": extensions}

    def register(self, kv_caches: Mapping[str, torch.Tensor], cpu_isa: str | None = None) -> None:
        """Take vLLM's per-layer KV caches. ``cpu_isa`` is the ISA vLLM's CPU attention uses (its
        KV layout depends on it): the layout is then found by writing sample KV with vLLM's own
        writer. A layout lmplug does not know turns lmplug off in this engine (every lookup a
        miss, nothing saved), with an error naming it; vLLM serves on."""
        names = sorted(kv_caches, key=_layer_order)
        self.layers = [kv_caches[name] for name in names]
        self.index = {name: position for position, name in enumerate(names)}
        model = self.config.model
        first = self.layers[0]
        try:
            if first.device.type == "cpu":
                layout = self._cpu_layout(cpu_isa, first.dtype)
            else:
                name = "flash" if first.shape[0] == 2 else "flashinfer"
                layout = layout_for(name, model.num_kv_heads, model.head_size, self.block_size)
            for layer in self.layers:
                layout.check(layer)
        except KVShapeError as exc:
            self.disabled = str(exc)
            self.server.disabled = self.disabled
            logger.error("lmplug is off in this engine, vLLM computes every prompt itself: %s", exc)
            return
        self.layout = layout
        if first.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=first.device)  # type: ignore[no-untyped-call]
            self._events = [torch.cuda.Event() for _ in self.layers]  # type: ignore[no-untyped-call]
        elif first.device.type == "cpu":
            self._copier = Copier()
        how = f", loads through vLLM's {self.writer.isa!r} writer" if self.writer is not None else ""
        logger.info("lmplug: %d KV layers in vLLM's %r layout%s", len(self.layers), layout.name, how)
        for name, extension in list(self.extensions.items()):
            try:
                extension.attach(_Engine(self))
            except Exception:
                logger.exception("lmplug engine extension %r could not start; it is off in this engine", name)
                del self.extensions[name]
                self.server.extensions.pop(name, None)

    def _cpu_layout(self, isa: str | None, dtype: torch.dtype) -> PagedLayout:
        model = self.config.model
        op = _cpu_writer_op()
        if op is None or isa is None:
            # No vLLM CPU kernels (lmplug driven without vLLM), or vLLM did not say which ISA it uses.
            log = logger.info if op is None else logger.warning
            log("lmplug: vLLM's CPU attention ISA is unknown; assuming the 'cpu' layout (ISA vec), unverified")
            return CpuLayout(model.num_kv_heads, model.head_size, self.block_size)
        writer = CpuWriter(op, isa, model.num_kv_heads, model.head_size, self.block_size)
        self.attention = CpuPagedAttention(isa, model.num_kv_heads, model.head_size, self.block_size)
        with torch.inference_mode(mode=False):
            layout = detect_cpu_layout(writer, dtype)
        if layout.loads_through_writer:
            self.writer = writer
        return layout

    def _placement(self, block_ids: Sequence[int], start: int, end: int) -> Placement:
        return Placement.of(block_ids, start, end, self.block_size, self.layers[0].device)

    # ------------------------------------------------------------------ loads

    def start_load(self, plan: StepPlan) -> None:
        """Take the step's leases (one hand-off to the cache's loop) and place their chunks; on
        CUDA, queue every layer's copies on the side stream."""
        started = time.perf_counter()
        self._loads, self._load_blocks = [], []
        self._loaded = [False] * len(self.layers)
        if plan.loads or plan.releases:
            try:
                self._taken = self.cache.run_sync(lambda: self._take(plan))
            except Exception:
                logger.exception("lmplug could not take the step's leases; vLLM recomputes")
                self._taken = _Taken({}, {}, [])
        if plan.loads and self.layout is None:
            size = self.block_size
            for spec in plan.loads:  # lmplug is off here: whatever was promised is recomputed
                self.failed_blocks.update(spec.block_ids[spec.start // size : -(-spec.end // size)])
        elif plan.loads:
            device = self.layers[0].device
            total = sum(spec.end - spec.start for spec in plan.loads)
            staging = self._staging("load", total) if device.type != "cpu" else None
            offset = 0
            for spec in plan.loads:
                self._plan_load(spec, staging.narrow(2, offset, spec.end - spec.start) if staging is not None else None)
                offset += spec.end - spec.start
        self.transfers.load_seconds += time.perf_counter() - started
        self._queue_loads()
        if plan.extension_loads:
            self._extension_loads(plan.extension_loads)

    def _queue_loads(self) -> None:
        """Start writing the placed chunks into vLLM's blocks: on the copy thread (CPU) or the side
        stream (CUDA), layer by layer."""
        if self._loads and self._copier is not None:
            self._load_jobs = [self._copier.submit(partial(self._scatter, p)) for p in range(len(self.layers))]
            return
        stream = self._stream
        if not self._loads or stream is None:
            return
        assert self.layout is not None
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for position, layer in enumerate(self.layers):
                for piece in self._loads:
                    self.layout.scatter_placed(layer, piece.placement, piece.kv[:, position])
                self._events[position].record(stream)

    def _extension_loads(self, loads: list[tuple[str, EngineLoad]]) -> None:
        """Have engine extensions write the tokens they claimed, once this step's exact loads are in
        place (an extension computes over them). A failure has vLLM recompute the tokens."""
        started = time.perf_counter()
        size = self.block_size
        if self.layout is not None:
            for position in range(len(self.layers)):  # the exact prefixes first, every layer
                self.wait_for_layer_position(position)
        for name, load in loads:
            extension = self.extensions.get(name)
            self.transfers.extension_loads += 1
            try:
                if extension is None or self.layout is None:
                    raise RuntimeError(f"engine extension {name!r} is not running in this worker")
                extension.load(load)
            except Exception as exc:
                self.transfers.extension_load_failures += 1
                logger.warning("lmplug engine extension %r failed to load a request; vLLM recomputes it: %s", name, exc)
                self.failed_blocks.update(load.block_ids[load.start // size : -(-load.end // size)])
        self.transfers.extension_seconds += time.perf_counter() - started

    def _take(self, plan: StepPlan) -> _Taken:
        """On the cache's loop: drop the leases vLLM no longer needs; reference each load's leased chunks."""
        for request_id in plan.releases:
            self.server.release(request_id)
        taken = _Taken({}, {}, [spec.request_id for spec in plan.loads])
        for spec in plan.loads:
            lease = self.server.lease(spec.request_id)
            if lease is None or not lease.active:
                continue
            chunks = lease.chunks
            taken.chunks[spec.request_id] = tuple(chunk.acquire() for chunk in chunks)
            taken.tokens[spec.request_id] = sum(chunk.num_tokens for chunk in chunks)
        return taken

    def _plan_load(self, spec: Span, staging: torch.Tensor | None) -> None:
        """Place the leased chunks covering ``[spec.start, spec.end)`` (through ``staging``, this
        request's part of a device buffer, on CUDA); report what the lease lacks."""
        assert self._taken is not None
        chunks = self._taken.chunks.get(spec.request_id, ())
        loaded = min(self._taken.tokens.get(spec.request_id, 0), spec.end)
        if loaded < spec.end:
            # Promised but not delivered (expired, evicted, failed): vLLM recomputes these blocks.
            first = max(loaded, spec.start) // self.block_size
            last = (spec.end - 1) // self.block_size
            self.failed_blocks.update(spec.block_ids[first : last + 1])
        if loaded <= spec.start:
            return
        position = 0  # token of the request where the chunk begins
        for chunk in chunks:
            begin, end = max(position, spec.start), min(position + chunk.num_tokens, loaded)
            if begin < end:
                kv = chunk.tensor.narrow(2, begin - position, end - begin)
                if staging is not None:
                    # Pinned host memory to the device, on the side stream, ahead of the scatters.
                    assert self._stream is not None
                    with torch.cuda.stream(self._stream):
                        kv = staging.narrow(2, begin - spec.start, end - begin).copy_(kv, non_blocking=True)
                slots = slot_tensor(spec.block_ids, begin, end, self.block_size) if self.writer is not None else None
                self._loads.append(_Piece(kv, self._placement(spec.block_ids, begin, end), slots))
            position += chunk.num_tokens
            if position >= loaded:
                break
        self.transfers.loaded_bytes += (loaded - spec.start) * self._bytes_per_token()
        self._load_blocks.extend(spec.block_ids[spec.start // self.block_size : (loaded - 1) // self.block_size + 1])

    def _bytes_per_token(self) -> int:
        model = self.config.model
        return 2 * len(self.layers) * model.num_kv_heads * model.head_size * self.layers[0].element_size()

    def wait_for_layer(self, layer_name: str) -> None:
        """Called before ``layer_name``'s attention runs: its loaded KV must be in place."""
        position = self.index.get(layer_name)
        if position is not None:
            self.wait_for_layer_position(position)

    def wait_for_layer_position(self, position: int) -> None:
        """:meth:`wait_for_layer` by the layer's position."""
        if not self._loads or self._loaded[position]:
            return
        self._loaded[position] = True
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._events[position])
            return
        started = time.perf_counter()
        if self._load_jobs:
            self._wait(self._load_jobs[position])
        else:
            self._scatter(position)
        self.transfers.load_wait_seconds += time.perf_counter() - started

    def _scatter(self, position: int) -> None:
        """Write layer ``position``'s loaded KV into vLLM's blocks (on the copy thread on the CPU)."""
        assert self.layout is not None
        started = time.perf_counter()
        layer = self.layers[position]
        for piece in self._loads:
            if piece.slots is not None and self.writer is not None:
                self.writer.write(layer, piece.slots, piece.kv[:, position])
            else:
                self.layout.scatter_placed(layer, piece.placement, piece.kv[:, position])
        self.transfers.load_seconds += time.perf_counter() - started

    def _wait(self, job: Future[object]) -> bool:
        """Wait for a copy job; False (logged) when it failed."""
        try:
            job.result()
        except Exception:
            logger.exception("lmplug copy failed")
            return False
        return True

    def _finish_loads(self) -> None:
        """After the forward: any layer whose attention never waited for its KV was computed
        without it, so its blocks are reported for recompute (never served wrong)."""
        jobs, self._load_jobs = self._load_jobs, []
        failed = not all([self._wait(job) for job in jobs])  # every job ends before the chunks go
        loads, self._loads = self._loads, []
        if not loads:
            return
        if self._stream is not None:
            self._stream.synchronize()  # the chunks may be released now
        if failed:
            self.failed_blocks.update(self._load_blocks)
            return
        if all(self._loaded):
            return
        if not self._warned_unloaded:
            self._warned_unloaded = True
            logger.warning(
                "lmplug: vLLM ran %d attention layers without asking for their loaded KV; "
                "those requests are recomputed",
                self._loaded.count(False),
            )
        self.failed_blocks.update(self._load_blocks)

    def _staging(self, purpose: str, tokens: int) -> torch.Tensor:
        """A reusable ``[2, layers, >= tokens, hidden]`` buffer on the KV cache's device (no page
        faults per step; on the CPU 4 KiB-aligned, for tiers that write with O_DIRECT)."""
        buffer = self._buffers.get(purpose)
        if buffer is None or buffer.shape[2] < tokens:
            model = self.config.model
            first = self.layers[0]
            capacity = max(tokens, 2 * buffer.shape[2] if buffer is not None else 0)
            layout = KVLayout(len(self.layers), model.num_kv_heads, model.head_size, first.dtype)
            # vLLM calls in under inference mode; the cache reads this buffer from its own
            # thread, which an inference tensor would refuse.
            with torch.inference_mode(mode=False):
                if first.device.type == "cpu":
                    buffer = empty_kv(layout, capacity)
                else:
                    buffer = torch.empty(layout.shape(capacity), dtype=first.dtype, device=first.device)
                self._buffers[purpose] = buffer
        return buffer

    # ------------------------------------------------------------------ saves

    def _save_buffers(self, plan: StepPlan) -> list[tuple[Span, Placement, torch.Tensor]]:
        if self._saves is None:
            self._slot ^= 1
            self._wait_gathered()
            self._wait_stored(self._slot)  # this buffer is free once the store two steps back read it
            staging = self._staging(f"save-{self._slot}", sum(spec.end - spec.start for spec in plan.saves))
            self._saves = []
            offset = 0
            for spec in plan.saves:
                kv = staging.narrow(2, offset, spec.end - spec.start)
                offset += spec.end - spec.start
                self._saves.append((spec, self._placement(spec.block_ids, spec.start, spec.end), kv))
            self._saved = [False] * len(self.layers)
        return self._saves

    def save_layer(self, layer_name: str, plan: StepPlan) -> None:
        """Called after ``layer_name``'s attention: gather this layer's newly computed KV."""
        position = self.index.get(layer_name)
        if not plan.saves or position is None or self.layout is None:
            return
        saves = self._save_buffers(plan)
        self._saved[position] = True
        if self._copier is not None:
            self._save_jobs.append(self._copier.submit(partial(self._gather, position, saves)))
        else:
            self._gather(position, saves)

    def _gather(self, position: int, saves: list[tuple[Span, Placement, torch.Tensor]]) -> None:
        """Copy layer ``position``'s new KV out of vLLM's blocks (on the copy thread on the CPU)."""
        assert self.layout is not None
        started = time.perf_counter()
        for _, placement, kv in saves:
            self.layout.gather_placed(self.layers[position], placement, kv[:, position])
        self.transfers.save_seconds += time.perf_counter() - started

    def save(self, plan: StepPlan) -> None:
        """After the forward: gather what was not gathered layer by layer, then store it and let
        go of this step's leases, in one hand-off to the cache's loop. On the CPU a step that
        finishes no request does not wait for its gathers: the copy thread ends them while vLLM
        samples and schedules, and the next step waits for them before its forward
        (:meth:`before_step`)."""
        ending = False
        try:
            ending = self._save(plan)
        finally:
            if not ending:  # saved or not, vLLM may free these requests' blocks now
                self._mark_finished(plan.finished)

    def _save(self, plan: StepPlan) -> bool:
        """Whether the copy thread ends the saves (and then reports ``plan.finished`` itself)."""
        self._finish_loads()
        if plan.extension_saves:
            self._extension_saves(plan.extension_saves)
        taken, self._taken = self._taken, None
        if not plan.saves or self.layout is None:
            self._saves = None
            if taken is not None:
                try:
                    self.cache.run_sync(lambda: self._let_go(taken))
                except Exception:
                    logger.exception("lmplug could not release the step's leases (they expire)")
            if plan.pushes and self.layout is not None:
                self._start_pushes(plan.pushes, [future for future in self._storing if future is not None])
            return False
        started = time.perf_counter()
        saves = self._save_buffers(plan)
        self._saves = None
        jobs, self._save_jobs = self._save_jobs, []
        missing = [position for position in range(len(self.layers)) if not self._saved[position]]
        if self._copier is not None:
            self._finishing = self._copier.submit(
                partial(self._end_saves, jobs, missing, saves, taken, plan.finished, self._slot, plan.pushes)
            )
            if plan.finished:
                # A finished request's blocks go back to vLLM when this step reports it sent:
                # end its save now, so vLLM frees them when it would without lmplug's thread
                # (vLLM's reset_prefix_cache, right after a generate, needs them free).
                self._wait_gathered()
                self.transfers.save_wait_seconds += time.perf_counter() - started
            return True
        gathered = all([self._wait(job) for job in jobs])
        for position in missing:
            self._gather(position, saves)
        if self.layers[0].is_cuda:
            torch.cuda.current_stream(self.layers[0].device).synchronize()
        self._hand_over(saves, gathered, taken, self._slot, plan.pushes)
        self.transfers.save_wait_seconds += time.perf_counter() - started
        return False

    def _extension_saves(self, saves: list[tuple[str, EngineSave]]) -> None:
        """Let extensions keep what they need of finished requests (their blocks are still held)."""
        started = time.perf_counter()
        for name, save in saves:
            extension = self.extensions.get(name)
            if extension is None or self.layout is None:
                continue
            try:
                extension.save(save)
            except Exception:
                logger.exception("lmplug engine extension %r failed to save a request", name)
        self.transfers.extension_seconds += time.perf_counter() - started

    def _end_saves(
        self,
        jobs: list[Future[object]],
        missing: list[int],
        saves: list[tuple[Span, Placement, torch.Tensor]],
        taken: _Taken | None,
        finished: list[str],
        slot: int,
        pushes: list[Push],
    ) -> None:
        """On the copy thread, after this step's gathers (one thread, jobs in order): gather the
        layers vLLM never handed over, hand the KV to the cache, report the finished requests."""
        try:
            gathered = all([self._wait(job) for job in jobs])
            for position in missing:
                self._gather(position, saves)
            self._hand_over(saves, gathered, taken, slot, pushes)
        finally:
            self._mark_finished(finished)

    def _hand_over(
        self,
        saves: list[tuple[Span, Placement, torch.Tensor]],
        gathered: bool,
        taken: _Taken | None,
        slot: int,
        pushes: list[Push],
    ) -> None:
        """The KV is out of vLLM's blocks: store it (and let go of the step's leases) on the
        cache's loop, while vLLM goes on; then push what a PD prefill asked to."""
        stored = [(spec, kv) for spec, _, kv in saves] if gathered else []  # never store KV not copied whole
        try:
            self._storing[slot] = self.cache.start_soon(self._store_all, stored, taken)
        except Exception:
            logger.exception("lmplug save failed; serving continues without it")
        self.transfers.saved_bytes += sum(kv.numel() * kv.element_size() for _, kv in stored)
        if pushes:
            self._start_pushes(pushes, [future for future in self._storing if future is not None])

    def _start_pushes(self, pushes: list[Push], stores: list[Future[None]]) -> None:
        """Push each PD prefill's prompt KV to its decode instance once ``stores`` are done, on the
        cache's loop, off vLLM's path (a push's stall never holds a step)."""
        for push in pushes:
            try:
                self.cache.start_soon(self._push, push, stores)
            except Exception:
                logger.exception(
                    "lmplug PD transfer %s could not start; the decode computes the prompt", push.transfer_id
                )

    async def _push(self, push: Push, stores: list[Future[None]]) -> None:
        """Send ``push.tokens``' KV (stored by the step that planned the push, or before) to the decode."""
        deadline = anyio.current_time() + push.timeout
        if not all(future.done() for future in stores):  # this prompt's saves are being stored (a few ms)
            await anyio.to_thread.run_sync(partial(concurrent.futures.wait, stores, timeout=push.timeout))
        self.transfers.pushes += 1
        pushed = 0
        try:
            pushed = await self.cache.async_cache.push(
                push.tokens,
                destination=push.destination,
                transfer_id=push.transfer_id,
                timeout=max(deadline - anyio.current_time(), 0.001),
            )
        except Exception:
            logger.exception("lmplug PD transfer %s to %s failed", push.transfer_id, push.destination)
        self.transfers.pushed_tokens += pushed
        if pushed < len(push.tokens):
            self.transfers.short_pushes += 1
            logger.warning(
                "lmplug PD transfer %s: the decode instance %s holds %d of %d prompt tokens; it computes the rest",
                push.transfer_id, push.destination, pushed, len(push.tokens),
            )  # fmt: skip
        else:
            logger.info("lmplug PD transfer %s: %d tokens pushed to %s", push.transfer_id, pushed, push.destination)

    def _mark_finished(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            with self._finished_lock:
                self.finished_saves.update(request_ids)

    def before_step(self) -> None:
        """Before each step's forward writes KV: the last step's gathers must be done, because
        vLLM may have given those blocks to other requests (a preempted request's) since."""
        if self._finishing is not None:
            started = time.perf_counter()
            self._wait_gathered()
            self.transfers.save_wait_seconds += time.perf_counter() - started

    def _wait_gathered(self) -> None:
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            self._wait(finishing)

    async def _store_all(self, saves: list[tuple[Span, torch.Tensor]], taken: _Taken | None) -> None:
        if taken is not None:
            self._let_go(taken)
        started = time.perf_counter()
        for spec, kv in saves:
            try:
                await self.cache.async_cache.store(spec.tokens, kv, start=spec.start)
            except Exception:
                logger.exception("lmplug save failed; serving continues without it")
        self.transfers.save_seconds += time.perf_counter() - started

    def wait_saves(self) -> None:
        """Wait until the last steps' saves are out of vLLM's blocks and stored."""
        self._wait_gathered()
        for slot in range(len(self._storing)):
            self._wait_stored(slot)

    def _wait_stored(self, slot: int) -> None:
        storing, self._storing[slot] = self._storing[slot], None
        if storing is not None:
            try:
                storing.result()
            except Exception:
                logger.exception("lmplug save failed; serving continues without it")

    def _let_go(self, taken: _Taken) -> None:
        """On the cache's loop: the loads are done; drop their references and leases."""
        for chunks in taken.chunks.values():
            for chunk in chunks:
                chunk.release()
        for request_id in taken.loads:
            self.server.release(request_id)

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    def take_finished_saves(self) -> set[str]:
        """Requests whose last save is done (vLLM may free their blocks now)."""
        with self._finished_lock:
            finished, self.finished_saves = self.finished_saves, set()
        return finished

    def close(self) -> None:
        """Stop the lookup channel (its task is cancelled with the cache) and close the cache."""
        for name, extension in self.extensions.items():
            try:
                extension.close()
            except Exception:
                logger.exception("lmplug engine extension %r failed to close", name)
        if self._copier is not None:
            self._copier.close()
        self.wait_saves()
        self.cache.close()


def _cpu_writer_op() -> Callable[..., object] | None:
    """vLLM's CPU KV writer kernel (``cpu_attn_reshape_and_cache``), or None where vLLM has none."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels)

        return cast("Callable[..., object]", torch.ops._C.cpu_attn_reshape_and_cache)
    except (ImportError, AttributeError, RuntimeError):
        return None


class _Engine:
    """What an engine extension sees of this worker (:class:`lmplug.tierkit.EngineWorker`)."""

    def __init__(self, worker: WorkerSide) -> None:
        assert worker.layout is not None
        self._worker = worker
        self._layout = worker.layout
        self.cache = worker.cache
        self.model = worker.model
        self.num_layers = len(worker.layers)
        self.world_size = worker.config.world_size
        self.rank = worker.rank
        self.device = worker.layers[0].device
        self.dtype = worker.layers[0].dtype

    def gather(self, layer: int, block_ids: Sequence[int], start: int, end: int, out: torch.Tensor) -> None:
        worker = self._worker
        self._layout.gather_placed(worker.layers[layer], worker._placement(block_ids, start, end), out)

    def scatter(self, layer: int, block_ids: Sequence[int], start: int, end: int, kv: torch.Tensor) -> None:
        worker = self._worker
        if worker.writer is not None:
            worker.writer.write(worker.layers[layer], slot_tensor(block_ids, start, end, worker.block_size), kv)
        else:
            self._layout.scatter_placed(worker.layers[layer], worker._placement(block_ids, start, end), kv)

    def attend(
        self,
        layer: int,
        block_ids: Sequence[int],
        query: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        window: int | None,
    ) -> torch.Tensor | None:
        attention = self._worker.attention
        if attention is None:
            return None
        return attention.attend(self._worker.layers[layer], block_ids, query, positions, scale, window)
