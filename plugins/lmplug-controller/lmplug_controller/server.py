"""The controller: the ZeroMQ side that workers talk to, the heartbeat deadline, and the
commands it forwards to workers. :meth:`Controller.serve` also runs the HTTP API (:mod:`.http`).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import zmq
from anyio.abc import SocketAttribute, TaskStatus

from lmplug_controller import DEFAULT_PORT, PROTOCOL_VERSION
from lmplug_controller.index import Index, Worker
from lmplug_controller.metrics import registry_for
from lmplug_controller.protocol import (
    KEY_SIZE,
    Holder,
    Kind,
    Message,
    ProtocolError,
    TierInfo,
    decode,
    encode,
    unpack_keys,
)
from lmplug_controller.zmqio import Channel

__all__ = [
    "Addresses",
    "CommandTimeout",
    "Controller",
    "ControllerConfig",
    "Counters",
    "UnknownInstance",
]

logger = logging.getLogger("lmplug.controller")


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """How a controller listens and how long it waits."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    """HTTP port; 0 picks a free one."""
    zmq_port: int = 0
    """Port of the workers' ZeroMQ socket (on ``host``); 0 picks a free one (workers learn it over HTTP)."""
    token: str | None = None
    """Shared secret of workers (REGISTER) and HTTP clients (``Authorization: Bearer``); ``None``: open."""
    heartbeat_seconds: float = 2.0
    missed_heartbeats: int = 3
    """A worker silent for this many heartbeat intervals is dropped with its entries."""
    command_timeout: float = 5.0
    """Seconds a worker has to answer a command (HTTP 504 after)."""

    def __post_init__(self) -> None:
        if self.heartbeat_seconds <= 0 or self.missed_heartbeats < 1 or self.command_timeout <= 0:
            raise ValueError("heartbeat_seconds and command_timeout must be positive, missed_heartbeats >= 1")

    @property
    def deadline(self) -> float:
        return self.heartbeat_seconds * self.missed_heartbeats


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where a serving controller listens."""

    host: str
    port: int
    zmq: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Counters:
    """What the controller has done since it started (the Prometheus metrics read these)."""

    registrations: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Registrations refused, by reason (version, auth, malformed)."""
    event_batches: int = 0
    admitted: int = 0
    evicted: int = 0
    gaps: int = 0
    snapshots: int = 0
    snapshot_keys: int = 0
    drops: int = 0
    lookups: int = 0
    lookup_hits: int = 0
    hit_chunks: int = 0
    lookup_chunks: int = 0
    bad_messages: int = 0
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Commands forwarded, by (op, outcome): ok, failed, timeout."""


class UnknownInstance(LookupError):
    """No registered worker has this instance id."""


class CommandTimeout(TimeoutError):
    """A worker did not answer a command in time."""


@dataclass
class _Pending:
    event: anyio.Event
    answer: dict[str, Any] | None = None


class Controller:
    """The registry and index with their ZeroMQ and HTTP front ends; :meth:`serve` runs them."""

    def __init__(self, config: ControllerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.index = Index()
        self.counters = Counters()
        self.started_at = clock()
        self.registry = registry_for(self)
        self.addresses: Addresses | None = None
        self._channel: Channel | None = None
        self._routes: dict[bytes, Worker] = {}
        """ZeroMQ routing id -> worker."""
        self._route_of: dict[int, bytes] = {}
        """Worker uid -> its routing id."""
        self._staging: dict[int, dict[str, list[bytes]]] = {}
        """Snapshots being received, by worker uid."""
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._stopping: anyio.Event | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ running

    async def serve(self, *, task_status: TaskStatus[Addresses] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen (HTTP and ZeroMQ) until :meth:`shutdown` or cancellation."""
        from lmplug_controller.http import serve_connection  # the HTTP module needs this one

        config = self.config
        self._stopping = anyio.Event()
        context = zmq.Context()
        sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            try:
                sock.bind(f"tcp://{config.host}:{config.zmq_port or '*'}")
            except zmq.ZMQError as exc:
                raise OSError(f"cannot bind the ZeroMQ port {config.zmq_port} on {config.host}: {exc}") from exc
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            listener = await anyio.create_tcp_listener(local_host=config.host, local_port=config.port)
            async with listener, anyio.create_task_group() as group:
                address = listener.extra(SocketAttribute.local_address)
                assert isinstance(address, tuple)
                self.addresses = Addresses(str(address[0]), int(address[1]), endpoint)
                self._channel = Channel(sock)
                group.start_soon(self._channel.pump, self.handle)
                group.start_soon(self._expire_forever)
                group.start_soon(listener.serve, lambda stream: serve_connection(self, stream))
                logger.info("lmplug-controller: HTTP on %s, workers on %s", self.addresses.url, endpoint)
                task_status.started(self.addresses)
                if not self._stop_requested:
                    await self._stopping.wait()
                group.cancel_scope.cancel()
        finally:
            self._channel = None
            for pending in self._pending.values():
                pending.event.set()
            sock.close(linger=0)
            context.destroy(linger=0)

    def shutdown(self) -> None:
        """Stop :meth:`serve` (idempotent)."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    async def _expire_forever(self) -> None:
        period = min(self.config.heartbeat_seconds / 2, 1.0)
        while True:
            await anyio.sleep(period)
            self.expire()

    def expire(self) -> list[Worker]:
        """Drop the workers silent past the deadline; those dropped."""
        dropped = self.index.expire(self.clock(), self.config.deadline)
        for worker in dropped:
            self._forget(worker)
            self.counters.drops += 1
            logger.warning(
                "lmplug-controller: dropped %s rank %d: silent for %.1f s",
                worker.instance_id,
                worker.rank,
                self.config.deadline,
            )
        return dropped

    def _forget(self, worker: Worker) -> None:
        route = self._route_of.pop(worker.uid, None)
        if route is not None and self._routes.get(route) is worker:
            del self._routes[route]
        self._staging.pop(worker.uid, None)

    # ------------------------------------------------------------------ ZeroMQ messages

    def handle(self, frames: list[bytes]) -> None:
        """One message from a worker: ``[routing id, kind, meta, blob?]``."""
        if len(frames) < 3:
            self.counters.bad_messages += 1
            return
        route = frames[0]
        try:
            message = decode(frames[1:])
        except ProtocolError as exc:
            self.counters.bad_messages += 1
            self._send(route, Kind.ERROR, {"code": "malformed", "message": str(exc)})
            return
        now = self.clock()
        if message.kind is Kind.REGISTER:
            self._register(route, message, now)
            return
        worker = self._routes.get(route)
        if worker is None:
            self._send(route, Kind.ERROR, {"code": "unregistered", "message": "not registered (again): send REGISTER"})
            return
        worker.last_heard = now
        try:
            self._dispatch(route, worker, message)
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            self.counters.bad_messages += 1
            self._send(route, Kind.ERROR, {"code": "malformed", "message": f"bad {message.kind}: {exc}"})

    def _dispatch(self, route: bytes, worker: Worker, message: Message) -> None:
        meta = message.meta
        kind = message.kind
        if kind is Kind.EVENTS:
            self.absorb(worker, int(meta["seq"]), meta["ops"], message.blob)
        elif kind is Kind.HEARTBEAT:
            self._heartbeat(route, worker, meta)
        elif kind is Kind.LOOKUP:
            exclude = meta.get("exclude")
            holders = self.lookup(unpack_keys(message.blob), exclude if isinstance(exclude, str) else None)
            self._send(route, Kind.LOOKUP_RESULT, {"id": meta["id"], "holders": [h.as_json() for h in holders]})
        elif kind is Kind.SNAPSHOT_BEGIN:
            self._staging[worker.uid] = {tier.name: [] for tier in worker.tiers}
        elif kind is Kind.SNAPSHOT_KEYS:
            staging = self._staging.get(worker.uid)
            if staging is not None:
                staging.setdefault(str(meta["tier"]), []).extend(unpack_keys(message.blob))
        elif kind is Kind.SNAPSHOT_END:
            self._end_snapshot(route, worker, meta)
        elif kind is Kind.COMMAND_RESULT:
            pending = self._pending.get(int(meta["id"]))
            if pending is not None:
                pending.answer = meta
                pending.event.set()
        else:
            raise ProtocolError(f"{kind} is not sent by workers")

    def _register(self, route: bytes, message: Message, now: float) -> None:
        meta = message.meta
        version = meta.get("version")
        if version != PROTOCOL_VERSION:
            self._refuse(
                route,
                "version",
                f"protocol version {version!r} is not supported: this controller speaks version {PROTOCOL_VERSION}",
            )
            return
        token = self.config.token
        offered = meta.get("token")
        if token is not None and not (
            isinstance(offered, str) and hmac.compare_digest(offered.encode(), token.encode())
        ):
            self._refuse(route, "auth", "bad or missing token")
            return
        try:
            instance_id, fingerprint_hex = meta["instance_id"], meta["fingerprint"]
            fingerprint = bytes.fromhex(fingerprint_hex)
            if not isinstance(instance_id, str) or not instance_id or len(fingerprint) != 8:
                raise ProtocolError("instance_id must be a non-empty string and fingerprint 16 hex digits")
            tiers = [TierInfo.from_json(tier) for tier in meta["tiers"]]
            rank, endpoint, incarnation = int(meta["rank"]), str(meta["endpoint"]), str(meta["incarnation"])
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            self._refuse(route, "malformed", f"bad REGISTER: {exc!r}")
            return
        worker = self.index.register(instance_id, fingerprint, rank, tiers, endpoint, incarnation, now)
        self._forget(worker)
        self._routes[route] = worker
        self._route_of[worker.uid] = route
        self.counters.registrations += 1
        logger.info("lmplug-controller: registered %s rank %d (%s)", instance_id, rank, endpoint)
        self._send(
            route,
            Kind.REGISTERED,
            {"worker": worker.uid, "heartbeat_seconds": self.config.heartbeat_seconds, "resync": worker.resync_epoch},
        )

    def _refuse(self, route: bytes, code: str, text: str) -> None:
        self.counters.refused[code] += 1
        logger.warning("lmplug-controller: registration refused: %s", text)
        self._send(route, Kind.ERROR, {"code": code, "message": text})

    def absorb(self, worker: Worker, seq: int, ops: list[Any], blob: bytes) -> None:
        """One EVENTS batch: ``ops`` is ``[["+" or "-", tier, count], ...]`` over the keys of ``blob`` in order.

        A batch out of sequence (one was lost) makes the worker dirty and asks it for a snapshot;
        the batch is applied all the same, as a hint until the snapshot replaces it.
        """
        total = sum(int(op[2]) for op in ops)
        if total * KEY_SIZE != len(blob):
            raise ProtocolError(f"the ops name {total} keys, the blob holds {len(blob)} bytes")
        if not worker.dirty and seq != worker.last_seq + 1:
            self._gap(worker, f"batch {seq} after {worker.last_seq}")
        worker.last_seq = seq
        start = 0
        index = self.index
        for sign, tier, count in ops:
            keys = unpack_keys(blob, start, count)
            start += count
            if sign == "+":
                index.admit(worker, tier, keys)
                self.counters.admitted += count
            elif sign == "-":
                index.evict(worker, tier, keys)
                self.counters.evicted += count
            else:
                raise ProtocolError(f"an op is '+' or '-', not {sign!r}")
        self.counters.event_batches += 1

    def _gap(self, worker: Worker, what: str) -> None:
        self.counters.gaps += 1
        epoch = self.index.want_snapshot(worker)
        logger.info("lmplug-controller: %s rank %d: %s; asking for a snapshot", worker.instance_id, worker.rank, what)
        route = self._route_of.get(worker.uid)
        if route is not None:
            self._send(route, Kind.RESYNC, {"resync": epoch})

    def _heartbeat(self, route: bytes, worker: Worker, meta: dict[str, Any]) -> None:
        stats = meta.get("stats")
        if isinstance(stats, dict):
            worker.stats = stats
        seq = int(meta.get("seq", worker.last_seq))
        if not worker.dirty and seq != worker.last_seq:
            self._gap(worker, f"heartbeat says batch {seq}, the last one seen is {worker.last_seq}")
        self._send(route, Kind.ACK, {"resync": worker.resync_epoch if worker.dirty else 0})

    def _end_snapshot(self, route: bytes, worker: Worker, meta: dict[str, Any]) -> None:
        staging = self._staging.pop(worker.uid, None)
        if staging is None:
            return
        epoch = int(meta.get("resync", 0))
        self.index.replace(worker, staging, int(meta["seq"]))
        if epoch != worker.resync_epoch:
            worker.dirty = True  # a newer snapshot was asked for meanwhile: the ACKs say so
        self.counters.snapshots += 1
        self.counters.snapshot_keys += sum(len(keys) for keys in staging.values())

    def _send(self, route: bytes, kind: Kind, meta: dict[str, Any], blob: bytes | None = None) -> bool:
        channel = self._channel
        return channel is not None and channel.send_nowait([route, *encode(kind, meta, blob)])

    # ------------------------------------------------------------------ queries and commands

    def lookup(self, keys: list[bytes], exclude_instance: str | None = None) -> list[Holder]:
        """Longest-prefix holders of ``keys`` (see :meth:`Index.lookup`), counted in the metrics."""
        holders = self.index.lookup(keys, exclude_instance)
        counters = self.counters
        counters.lookups += 1
        counters.lookup_chunks += len(keys)
        if holders:
            counters.lookup_hits += 1
            counters.hit_chunks += holders[0].chunks
        return holders

    def workers_of(self, instance_id: str) -> list[Worker]:
        """The workers of ``instance_id``; :class:`UnknownInstance` when there are none."""
        workers = self.index.of_instance(instance_id)
        if not workers:
            raise UnknownInstance(f"no instance {instance_id!r} is registered")
        return workers

    async def command(
        self, worker: Worker, op: str, args: dict[str, Any], within: float | None = None
    ) -> dict[str, Any]:
        """Ask ``worker`` to run ``op``; its answer ``{"ok": bool, "result"?: dict, "error"?: str}``.

        :class:`CommandTimeout` when it does not answer within ``within`` seconds (by default the
        configured command timeout).
        """
        limit = self.config.command_timeout if within is None else within
        route = self._route_of.get(worker.uid)
        request_id = next(self._ids)
        pending = _Pending(anyio.Event())
        self._pending[request_id] = pending
        try:
            if route is None or not self._send(route, Kind.COMMAND, {"id": request_id, "op": op, "args": args}):
                raise CommandTimeout(f"{worker.instance_id} rank {worker.rank} cannot be reached")
            with anyio.move_on_after(limit):
                await pending.event.wait()
        finally:
            del self._pending[request_id]
        answer = pending.answer
        if answer is None:
            self.counters.commands[(op, "timeout")] += 1
            raise CommandTimeout(f"{worker.instance_id} rank {worker.rank} did not answer {op!r} within {limit:g} s")
        ok = bool(answer.get("ok"))
        self.counters.commands[(op, "ok" if ok else "failed")] += 1
        reply: dict[str, Any] = {"ok": ok}
        if "result" in answer:
            reply["result"] = answer["result"]
        if not ok:
            reply["error"] = str(answer.get("error", "failed"))
        return reply

    def describe(self, worker: Worker) -> dict[str, Any]:
        """What ``GET /v1/instances`` shows of ``worker``."""
        now = self.clock()
        chunks = self.index.chunks(worker)
        reported = worker.stats.get("tiers", {}) if isinstance(worker.stats.get("tiers"), dict) else {}
        tiers = []
        for tier in worker.tiers:
            usage = reported.get(tier.name)
            tiers.append(
                {
                    **tier.as_json(),
                    "chunks_indexed": chunks.get(tier.name, 0),
                    "stats": usage if isinstance(usage, dict) else {},
                }
            )
        return {
            "instance_id": worker.instance_id,
            "fingerprint": worker.fingerprint.hex(),
            "rank": worker.rank,
            "endpoint": worker.endpoint,
            "incarnation": worker.incarnation,
            "tiers": tiers,
            "chunks_indexed": sum(chunks.values()),
            "connected": now - worker.last_heard <= self.config.heartbeat_seconds * 1.5,
            "resyncing": worker.dirty,
            "last_heartbeat_seconds_ago": round(now - worker.last_heard, 3),
            "registered_seconds_ago": round(now - worker.registered_at, 3),
            "lookups_served": worker.lookups_served,
            "chunks_served": worker.chunks_served,
            "stats": worker.stats,
        }

    def instances(self) -> list[dict[str, Any]]:
        """Every registered instance with its workers (one per TP rank)."""
        grouped: dict[str, list[dict[str, Any]]] = {}
        for worker in self.index.workers():
            grouped.setdefault(worker.instance_id, []).append(self.describe(worker))
        return [{"instance_id": instance, "workers": workers} for instance, workers in grouped.items()]
