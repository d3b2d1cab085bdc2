"""The plugin contract: every hook lmplug defines, with its docstring as its contract.

There are two colours of hook.

*Composition hooks* are synchronous, called through pluggy's own ``pm.hook`` at start-up
(or by the CLI) on the plugin modules loaded from the ``lmplug`` entry-point group. A
plugin package implements them in its ``__init__.py``.

*Data-path hooks* are ``async`` and implemented as methods of the tier objects that a
plugin's tier factory builds (see :class:`lmplug.tierkit.Tier`). pluggy's call loop cannot await
coroutines, so they are never called through ``pm.hook``: the cache registers each
configured tier object with its plugin manager (which checks the signatures against these
specs) and the pipeline in :mod:`lmplug.core.pipeline` awaits each tier's hookimpl in
pipeline order, with the semantics each spec names. All data-path hooks run on the cache's
event-loop thread, in the process that opened the cache, under asyncio or trio; blocking
work belongs in ``anyio.to_thread.run_sync`` with the tier's own ``CapacityLimiter``.

Chunk ownership: a :class:`lmplug.tierkit.KVChunk` carries a reference count. A hook that keeps a
chunk beyond its call takes a reference (``chunk.acquire()``) and releases it when done;
a hook that hands chunks out (``lmplug_retrieve``) hands each with one reference that the
caller releases.
"""

# mypy: disable-error-code="empty-body"
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

from lmplug.hooks.markers import PROJECT, hookspec

if TYPE_CHECKING:
    import torch

    from lmplug.core.commands import CliCommand
    from lmplug.core.extension import EngineExtensionType
    from lmplug.core.keys import ChunkKey
    from lmplug.core.memory import KVChunk
    from lmplug.core.remote import ChunkCodec, PeerTransport, RemoteScheme
    from lmplug.core.tier import TierType

# --------------------------------------------------------------------------- composition


@hookspec
def lmplug_register_tier_types(register: Callable[[TierType], None]) -> None:  # type: ignore[type-arg]
    """Offer tier types, by calling ``register(TierType(...))`` once for each.

    :param register: records a :class:`lmplug.tierkit.TierType`: its ``name`` (what a config's
        ``tiers[].type`` says), its ``config_model`` (a pydantic model of the tier's own
        options, unknown keys rejected) and its ``factory(context, options) -> Tier``.
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, once per plugin manager, at start-up, before any
    tier is built. Two plugins registering the same name is a start-up error.
    **Colour:** sync composition hook, implemented by plugin modules.
    **Process:** every process that opens a cache or runs ``lmplug`` commands.
    """


@hookspec
def lmplug_register_commands(register: Callable[[CliCommand], None]) -> None:
    """Add sub-commands to the ``lmplug`` command line.

    :param register: records a :class:`lmplug.tierkit.CliCommand` (name, help, a function that
        adds its arguments to an ``argparse`` parser, and a function that runs it and
        returns the exit status).
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, once, when the ``lmplug`` command starts.
    **Colour:** sync composition hook, implemented by plugin modules.
    **Process:** the ``lmplug`` command only.
    """


@hookspec
def lmplug_register_remote_schemes(register: Callable[[RemoteScheme], None]) -> None:  # type: ignore[type-arg]
    """Offer connectors to shared stores, by calling ``register(RemoteScheme(...))`` once for each.

    :param register: records a :class:`lmplug.tierkit.RemoteScheme`: the URL ``schemes`` it serves
        (``("redis", "rediss")``), the ``config_model`` of a remote tier's ``connector:``
        options for them, and ``factory(url, options) -> RemoteConnector``.
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, once per plugin manager, at start-up. Two plugins
    registering the same scheme is a start-up error.
    **Colour:** sync composition hook, implemented by plugin modules.
    **Process:** every process that opens a cache or runs ``lmplug`` commands.
    """


@hookspec
def lmplug_register_transports(register: Callable[[PeerTransport], None]) -> None:
    """Offer ways to move chunks between instances, by calling ``register(PeerTransport(...))`` once for each.

    :param register: records a :class:`lmplug.tierkit.PeerTransport`: the ``name`` a peer tier's
        ``transport:`` option gives and the ``factory`` that builds it (its signature is the
        peer tier's contract: lmplug-p2p documents it).
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, once per plugin manager, at start-up. Two plugins
    registering the same name is a start-up error.
    **Colour:** sync composition hook, implemented by plugin modules.
    **Process:** every process that opens a cache or runs ``lmplug`` commands.
    """


@hookspec
def lmplug_register_codecs(register: Callable[[ChunkCodec], None]) -> None:
    """Offer chunk codecs (compression, quantization), by calling ``register(codec)`` once for each.

    :param register: records a :class:`lmplug.tierkit.ChunkCodec` instance under its ``name``
        (what a shared tier's ``codec:`` option says). ``raw`` is built in.
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, once per plugin manager, at start-up. Two plugins
    registering the same name is a start-up error.
    **Colour:** sync composition hook, implemented by plugin modules.
    **Process:** every process that opens a cache or runs ``lmplug`` commands.
    """


@hookspec
def lmplug_register_engine_extensions(register: Callable[[EngineExtensionType], None]) -> None:  # type: ignore[type-arg]
    """Offer engine extensions, by calling ``register(EngineExtensionType(...))`` once for each.

    :param register: records a :class:`lmplug.tierkit.EngineExtensionType`: its ``name`` (the key
        under the config's ``extensions:``), its ``config_model`` (a pydantic model of its options,
        unknown keys rejected) and its ``factory(options) -> EngineExtension``. An extension changes
        what an engine's requests reuse beyond their exact prefix (CacheBlend's passages); the
        contract of the object the factory builds is :class:`lmplug.tierkit.EngineExtension`.
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, once per plugin manager, at start-up. Two plugins
    registering the same name is a start-up error. Only the extensions the config lists are built.
    **Colour:** sync composition hook, implemented by plugin modules.
    **Process:** both processes of an engine with lmplug's connector (scheduler and workers).
    """


@hookspec
def lmplug_chunks_admitted(tier: str, keys: Sequence[ChunkKey]) -> None:
    """Listen for chunks a tier admitted (stored, promoted into it, or written by its write-behind queue).

    :param tier: the configured name of the tier that now holds them.
    :param keys: the keys it admitted.
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, synchronously, on the cache's event-loop thread,
    right after the tier admitted the keys; must be quick and must not raise. Chunks a tier
    held before the cache opened (a disk tier's files) are not announced: list them with
    ``lmplug_held_keys``.
    **Colour:** sync notification hook, implemented by plugin modules.
    **Process:** the process that opened the cache.
    """


@hookspec
def lmplug_chunks_evicted(tier: str, keys: Sequence[ChunkKey]) -> None:
    """Listen for chunks a tier dropped (under memory pressure or on command).

    :param tier: the configured name of the tier that dropped them.
    :param keys: the keys it no longer holds.
    :returns: nothing; results are ignored.

    **Call pattern:** all implementations, synchronously, on the cache's event-loop thread,
    right after the tier dropped the keys; must be quick and must not raise.
    **Colour:** sync notification hook, implemented by plugin modules.
    **Process:** the process that opened the cache.
    """


# --------------------------------------------------------------------------- data path


@hookspec
async def lmplug_contains(keys: Sequence[ChunkKey]) -> int:
    """Say how many of ``keys``, counted from the first, this tier holds.

    :param keys: chunk keys of one token sequence, in order.
    :returns: ``n`` such that ``keys[:n]`` are all held and ``keys[n]`` is not (0 when the
        first is missing). It is a hint: a later retrieve may still miss.

    **Call pattern:** awaited per tier in pipeline order; the dispatcher asks later tiers
    about the keys earlier ones lack, and counts only contiguous hits from the start.
    **Colour:** async data path, implemented by tier objects.
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_retrieve(keys: Sequence[ChunkKey]) -> list[KVChunk]:
    """Hand out the chunks of ``keys`` this tier holds, counted from the first.

    :param keys: chunk keys of one token sequence, in order.
    :returns: chunks for ``keys[:n]``, in order, stopping at the first miss; each carries
        one reference for the caller. An empty list is a miss. Data that fails validation
        (corrupt, truncated, foreign) is a miss and is dropped, never returned.
        A backend failure may raise :class:`lmplug.errors.TierError`; the dispatcher
        treats it as a miss.

    **Call pattern:** waterfall: awaited per tier in pipeline order; the first tier that
    has a chunk serves it. A hit below the first tier is promoted into the tiers above
    it through ``lmplug_transfer``.
    **Colour:** async data path, implemented by tier objects.
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_retrieve_into(keys: Sequence[ChunkKey], out: torch.Tensor) -> int:
    """Write the KV of the leading ``keys`` this tier holds straight into the caller's ``out``.

    Optional: implemented by tiers that declare :attr:`lmplug.tierkit.Capability.RETRIEVE_INTO`, which
    can read from their store into any memory (a file or socket read into ``out`` itself, or
    into the tier's own staging with the copy into ``out`` overlapping its other reads) rather
    than into chunks that the caller then copies.

    :param keys: chunk keys of one token sequence, in order.
    :param out: ``[2, layers, tokens, hidden]`` of the configured dtype covering the tokens of
        ``keys`` and no more: key ``i`` owns tokens ``[i * chunk_size, (i + 1) * chunk_size)``
        (the last key may own fewer). It may be a view of a larger buffer, strided along the
        token dimension, on the CPU or a CUDA device. A tier that cannot write somewhere (a
        CUDA ``out``, odd strides) falls back to reading chunks and copying them itself.
    :returns: ``n`` such that the tokens of ``keys[:n]`` in ``out`` hold their KV, verified as
        ``lmplug_retrieve`` verifies it, stopping at the first miss. Tokens past those may have
        been written (bytes that failed verification, a read cut short): the caller ignores
        them. Copies into a CUDA ``out`` may still be queued on the current stream when this
        returns (the caller synchronises), but must not read memory the tier reuses afterwards.
        A backend failure may raise :class:`lmplug.errors.TierError`; the dispatcher treats it
        as a miss.

    **Call pattern:** part of the retrieve waterfall: when the caller gave an ``out`` buffer
    (``Cache.retrieve(tokens, out=...)``), the dispatcher awaits this instead of
    ``lmplug_retrieve`` on the *first* tier of the pipeline, which has no tier above it to
    promote chunks into; tiers below still hand out chunks, which are promoted.
    **Colour:** async data path, implemented by tier objects (optional, see above).
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_store(keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
    """Offer newly computed chunks to the tier.

    :param keys: chunk keys, in order.
    :param chunks: their KV, one per key; the caller keeps its own references, so a tier
        that keeps a chunk (in its index or in a write queue) acquires one.
    :returns: nothing. A tier may decline chunks (full, duplicates); it must never block
        the caller on slow I/O: slow tiers queue a write-behind and return.

    **Call pattern:** write-all: awaited for every tier, in pipeline order.
    **Colour:** async data path, implemented by tier objects.
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_evict(keys: Sequence[ChunkKey]) -> int:
    """Drop ``keys`` from the tier on command.

    :param keys: chunk keys to drop; unknown keys are ignored. Chunks that are pinned or
        in use are left in place.
    :returns: how many keys were dropped.

    **Call pattern:** awaited for every tier that the command names, in pipeline order.
    Eviction under memory pressure is the tier's own business; either way a tier reports
    drops through ``TierContext.report_evicted`` (which calls ``lmplug_chunks_evicted``), as it
    reports what it admits through ``TierContext.report_admitted``.
    **Colour:** async data path, implemented by tier objects.
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_transfer(keys: Sequence[ChunkKey], chunks: Sequence[KVChunk], source: str) -> int:
    """Admit chunks that come from another tier or node (promotion, peer moves, PD push).

    :param keys: chunk keys, in order.
    :param chunks: their KV; the caller keeps its references, so a tier that keeps a chunk
        acquires one.
    :param source: the configured name of the tier (or the peer) they come from.
    :returns: how many of the chunks, counted from the first, the tier now holds.

    **Call pattern:** awaited on each tier above the one that served a retrieve hit, in
    pipeline order (promotion); by transfer plugins for moves between nodes.
    **Colour:** async data path, implemented by tier objects (:class:`lmplug.tierkit.Tier`
    provides a default that admits them as ``lmplug_store`` would).
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_held_keys() -> list[ChunkKey]:
    """List every key the tier holds now.

    Optional: implemented by tiers that declare :attr:`lmplug.tierkit.Capability.LISTS_KEYS`
    (tiers with an index of their own: host memory, a local disk). A peer tier advertises
    this list to a controller when it registers, then follows ``lmplug_chunks_admitted`` /
    ``lmplug_chunks_evicted``.

    :returns: the keys, in any order; chunks whose writes are still queued are not held yet.

    **Call pattern:** awaited on demand (a peer tier's registration or resynchronisation),
    never on the engine's critical path.
    **Colour:** async, implemented by tier objects (optional, see above).
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_push(keys: Sequence[ChunkKey], destination: str, transfer_id: str, timeout: float) -> int:  # noqa: ASYNC109
    """Send the chunks of ``keys`` that this instance holds to another instance, which admits them.

    Optional: implemented by tiers that declare :attr:`lmplug.tierkit.Capability.PUSH` (the PD
    sender of ``lmplug-pd``: a prefill instance hands a prompt's KV to a decode instance).
    The tier reads the chunks from the cache's local tiers (:meth:`TierContext.local_tiers`).

    :param keys: chunk keys of one token sequence, in order (the last may be a partial chunk's).
    :param destination: where to send them, in the form the tier's documentation gives (for
        ``lmplug-pd``, the ``host:port`` of the decode instance's receiver).
    :param transfer_id: the caller's id for this transfer (unique; the receiver refuses one it
        has seen), named in logs and statistics on both sides.
    :param timeout: seconds the whole push may take; then it stops.
    :returns: ``n`` such that the destination now holds the chunks of ``keys[:n]``, verified
        (``0`` when nothing was sent: no chunk held here, the destination unreachable, full or
        refusing). A failure never raises: it is a shorter push, and the destination computes
        the rest itself.

    **Call pattern:** awaited through ``Cache.push`` on the first tier that declares
    :attr:`~lmplug.tierkit.Capability.PUSH`, off the engine's critical path.
    **Colour:** async, implemented by tier objects (optional, see above).
    **Process:** the process that opened the cache.
    """


@hookspec
async def lmplug_transfer_state(transfer_id: str) -> str | None:
    """How a transfer that another instance pushes to this one stands.

    Optional: implemented, with ``lmplug_push``, by tiers that declare
    :attr:`lmplug.tierkit.Capability.PUSH` (the receiving side of the PD transfer).

    :param transfer_id: the id the sender gave the transfer (``lmplug_push``'s ``transfer_id``).
    :returns: ``"receiving"``; ``"completed"`` (every chunk offered arrived); ``"failed"`` (it
        ended early: the chunks verified before that are held); ``"rejected"`` (refused before
        any chunk: full, too large, shutting down); or None (not opened here, or long ago).

    **Call pattern:** awaited through ``Cache.transfer_state`` when an engine waits for pushed KV
    (a PD decode's scheduler, a few times a second), to stop waiting as soon as nothing more
    will come.
    **Colour:** async, implemented by tier objects (optional, see above).
    **Process:** the process that opened the cache.
    """


DATA_PATH_HOOKS = ("lmplug_contains", "lmplug_retrieve", "lmplug_store", "lmplug_evict", "lmplug_transfer")
"""The async hooks every tier object implements."""
OPTIONAL_DATA_PATH_HOOKS = {
    "lmplug_retrieve_into": "RETRIEVE_INTO",
    "lmplug_held_keys": "LISTS_KEYS",
    "lmplug_push": "PUSH",
    "lmplug_transfer_state": "PUSH",
}
"""The async hooks a tier object implements exactly when it declares the named
:class:`lmplug.tierkit.Capability` (and must not implement otherwise)."""


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager holding lmplug's hookspecs and nothing else."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(sys.modules[__name__])
    return pm
