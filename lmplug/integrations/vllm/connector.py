"""``LMPlugConnector``: vLLM's v1 KV connector backed by lmplug.

Select it with ``--kv-transfer-config '{"kv_connector":"LMPlugConnector","kv_role":"kv_both"}'``
(lmplug registers the name through vLLM's ``vllm.general_plugins`` entry point) and point
``LMPLUG_CONFIG`` (or ``kv_connector_extra_config["lmplug_config"]``) at a stack.

vLLM builds one instance per role. The scheduler instance (EngineCore process) asks each
worker's cache (one per tensor-parallel rank) over a Unix socket how many leading prompt
tokens it can supply; the lookup moves no data and leases what it found (a lower tier's
chunks are promoted while the request waits: vLLM is told to ask again next step). It
plans each step's loads, saves and lease releases. The worker instance owns the cache: it
writes the leased chunks into vLLM's blocks layer by layer as attention reaches each
layer; it gathers newly computed full chunks layer by layer and stores them after the
forward; when a request finishes, vLLM keeps its blocks one more step while the rest of
its KV (the partial last chunk and the generated answer, all but the last token) is
saved. Any lmplug failure becomes recompute, never a wrong answer.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmplug.hooks.manager import PluginHost
from lmplug.integrations.vllm.lookup import LookupClient, socket_path
from lmplug.integrations.vllm.scheduler import SchedulerSide, StepPlan
from lmplug.integrations.vllm.settings import engine_config
from lmplug.integrations.vllm.worker import WorkerSide

logger = logging.getLogger("lmplug.vllm")

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


@dataclass
class LMPlugMetadata(KVConnectorMetadata):
    """One step's plan, sent from the scheduler to the worker."""

    plan: StepPlan = field(default_factory=StepPlan)


class LMPlugConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        rank = _tensor_parallel_rank() if role == KVConnectorRole.WORKER else 0
        config = engine_config(vllm_config, rank)
        transfer = vllm_config.kv_transfer_config
        engine_id = str(transfer.engine_id if transfer is not None else "default")
        block_size = int(vllm_config.cache_config.block_size)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer is not None and transfer.kv_load_failure_policy != "recompute":
                # vLLM reads the policy right after building this object. For a cache, KV that
                # cannot be delivered is a miss to recompute, never a failed request.
                logger.info("lmplug: setting kv_load_failure_policy to 'recompute' (a cache miss is never fatal)")
                object.__setattr__(transfer, "kv_load_failure_policy", "recompute")
            clients = [LookupClient(socket_path(engine_id, r)) for r in range(config.world_size)]
            # Plugins load here only for a config that lists extensions (the worker's cache loads them anyway).
            extensions = (
                PluginHost.from_environment().build_engine_extensions(config.extensions) if config.extensions else []
            )
            self._scheduler = SchedulerSide(
                clients, config.chunk_size, config.save_partial_chunks, extensions=extensions
            )
        else:
            self._worker = WorkerSide(config, engine_id, block_size, rank)

    # ---------------------------------------------------------------- scheduler role

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        # None: lower tiers are being read (or an earlier turn is being saved); vLLM asks again next step.
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return LMPlugMetadata(self._scheduler.build_step_plan(scheduler_output))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        # True: keep the blocks until the worker has saved the rest of the request's KV. The
        # params (PD requests) go into the response's kv_transfer_params.
        return self._scheduler.finished(request, block_ids)

    # ---------------------------------------------------------------- worker role

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:  # vLLM binds each step's metadata before its forward
            self._worker.before_step()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        if self._worker.extensions:  # extensions that compute (CacheBlend) run the engine's model
            self._worker.model = _engine_model()
        self._worker.register(kv_caches, _cpu_attention_isa(self._vllm_config, list(kv_caches)))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.save_layer(layer_name, self._plan())

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.save(self._plan())

    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LMPlugMetadata)
        return metadata.plan

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.take_finished_saves() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._scheduler is not None:
            for client in self._scheduler.lookups:
                client.close()


def _engine_model() -> Any | None:
    """vLLM's model module, from the model runner that is registering its KV caches (vLLM offers a
    connector no handle on the model: the runner is the caller's ``self``). None when not found."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        get_model = getattr(owner, "get_model", None)
        if owner is not None and callable(get_model) and hasattr(owner, "kv_caches"):
            try:
                model = get_model()
            except Exception:
                return None
            unwrap = getattr(model, "unwrap", None)  # a CUDA-graph wrapper around the model
            return unwrap() if callable(unwrap) else model
        frame = frame.f_back
    logger.warning("lmplug: vLLM's model runner was not found; engine extensions that compute are off")
    return None


def _tensor_parallel_rank() -> int:
    """This worker's tensor-parallel rank (0 when vLLM's parallel state is not set up)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, ImportError, RuntimeError):
        return 0


def _cpu_attention_isa(vllm_config: VllmConfig, layer_names: list[str]) -> str | None:
    """The ISA vLLM's CPU attention uses for these layers (it decides their KV layout), else None."""
    context = vllm_config.compilation_config.static_forward_context
    for name in layer_names:
        isa = getattr(context.get(name), "isa", None)
        if isinstance(isa, str):
            return isa
    try:  # not set on the layers (another vLLM version): ask the function that picks it
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        model = vllm_config.model_config
        cache = vllm_config.cache_config
        dtype = model.dtype if isinstance(model.dtype, torch.dtype) else getattr(torch, str(model.dtype))
        return str(_get_attn_isa(dtype, cache.block_size, model.get_head_size(), cache.cache_dtype))
    except Exception:  # not a CPU build, or the function changed: the worker assumes the 'cpu' layout
        return None
