"""Engine extensions: plugins that change what an engine's request reuses, beyond its exact prefix.

The connector of an engine (vLLM's, :mod:`lmplug.integrations.vllm`) serves every request's
exact prefix from the cache itself. An engine extension adds what a prefix lookup cannot see:
CacheBlend (``lmplug-blend``) reuses the KV of passages anywhere in a prompt. It runs in both
of the engine's processes:

- in the **scheduler** process, :meth:`EngineExtension.claim` says how many tokens after the
  exact prefix it will supply (it may ask its worker side over the engine's lookup channel);
- in the **worker** process, :meth:`EngineExtension.load` writes the KV of those tokens into the
  engine's blocks before the forward, and :meth:`EngineExtension.save` keeps what it needs from
  requests that were computed exactly.

A failure in either is never an error for the engine: the tokens are recomputed.

Extensions are configured under ``extensions.<name>`` in lmplug's config (off unless
configured), validated by the ``config_model`` of the :class:`EngineExtensionType` a plugin
registers through ``lmplug_register_engine_extensions``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

ConfigT = TypeVar("ConfigT", bound=BaseModel)

ChannelCall = Callable[[bytes], "list[bytes] | None"]
"""Ask the extension's worker side (:meth:`EngineExtension.answer`) on every tensor-parallel rank:
the replies, rank by rank, or None when a worker could not answer."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A request as the scheduler sees it: its id, its prompt's token ids, and the parameters the
    client sent for lmplug (vLLM's ``kv_transfer_params``; empty when none)."""

    request_id: str
    tokens: Sequence[int]
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Claim:
    """What an extension supplies: the KV of the prompt's tokens up to ``end`` (from the end of the
    exact prefix), and a picklable ``payload`` that travels to its worker side with the load."""

    end: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Write the KV of ``tokens[start:end]`` into the request's ``block_ids`` (the prompt's tokens up
    to ``end``; the KV of ``tokens[:start]`` is in the blocks already, exact)."""

    request_id: str
    tokens: Sequence[int]
    block_ids: Sequence[int]
    start: int
    end: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class EngineSave:
    """A request computed exactly, and finished: the exact KV of its first ``computed`` prompt
    ``tokens`` is in ``block_ids`` until :meth:`EngineExtension.save` returns."""

    request_id: str
    tokens: Sequence[int]
    block_ids: Sequence[int]
    computed: int
    params: Mapping[str, Any] = field(default_factory=dict)


class EngineWorker(Protocol):
    """What the engine's worker process offers an extension (:meth:`EngineExtension.attach`)."""

    cache: Any
    """The worker's cache, a :class:`lmplug.SyncCache` (every tier, every key domain)."""
    model: Any | None
    """The engine's model module (vLLM's ``nn.Module``), or None when the engine did not expose it."""
    num_layers: int
    world_size: int
    rank: int
    device: torch.device
    dtype: torch.dtype

    def gather(self, layer: int, block_ids: Sequence[int], start: int, end: int, out: torch.Tensor) -> None:
        """Copy the KV of tokens ``[start, end)`` of one layer out of a request's blocks into ``out``
        ``[2, end - start, kv_heads * head_size]``."""
        ...

    def scatter(self, layer: int, block_ids: Sequence[int], start: int, end: int, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, end - start, kv_heads * head_size]`` (on :attr:`device`) as the KV of tokens
        ``[start, end)`` of one layer into a request's blocks, where the engine's attention reads it."""
        ...

    def attend(
        self,
        layer: int,
        block_ids: Sequence[int],
        query: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        window: int | None,
    ) -> torch.Tensor | None:
        """Attention of ``query`` ``[n, heads, head_size]`` at increasing ``positions`` over the KV of one
        layer in a request's blocks, each query over the keys at or before its position (within
        ``window``), with the engine's own kernel: ``[n, heads * head_size]``. None when the engine
        offers no such kernel here (gather the KV and attend to it yourself)."""
        ...


class EngineExtension:
    """Base of the objects an :class:`EngineExtensionType`'s factory builds; every method but
    :meth:`claim` and :meth:`load` has a default that does nothing.

    Each method is called on the engine's thread, one call at a time, except :meth:`answer`,
    which runs on the worker cache's event loop.
    """

    name: str = ""

    # -------------------------------------------------------------- scheduler process

    def claim(self, request: EngineRequest, computed: int, exact: int, call: ChannelCall) -> Claim | None:
        """How far beyond ``exact`` (the tokens the engine computed or lmplug loads exactly, at least
        ``computed``) this extension supplies the prompt's KV; None: not this request. ``end``
        must be at most ``len(request.tokens) - 1`` (the engine computes the last prompt token).
        Nothing the request computes after a claim is saved under prefix keys."""
        raise NotImplementedError

    def wants_save(self, request: EngineRequest) -> bool:
        """Whether a request computed exactly should be offered to :meth:`save` when it finishes
        (its blocks are then kept until the save is done)."""
        return False

    # -------------------------------------------------------------- worker process

    def attach(self, worker: EngineWorker) -> None:
        """The engine's worker is ready (its KV cache registered): keep what :meth:`load` needs."""

    async def answer(self, message: bytes) -> bytes:
        """Answer the scheduler side's ``call(message)``, on the worker cache's event loop."""
        raise NotImplementedError

    def load(self, load: EngineLoad) -> None:
        """Write the KV of ``load``'s tokens into its blocks, every layer, before the forward. Raise
        (anything) to have the engine recompute them instead."""
        raise NotImplementedError

    def save(self, save: EngineSave) -> None:
        """Keep what the extension needs of a request computed exactly (after its last forward)."""

    def statistics(self) -> dict[str, object]:
        """Counters for the engine's statistics."""
        return {}

    def close(self) -> None:
        """The engine is shutting down."""


@dataclass(frozen=True, slots=True)
class EngineExtensionType(Generic[ConfigT]):
    """An engine extension a plugin offers: its name (the key under ``extensions:``), the model of
    its options, and its factory."""

    name: str
    config_model: type[ConfigT]
    factory: Callable[[ConfigT], EngineExtension]
    summary: str = ""
