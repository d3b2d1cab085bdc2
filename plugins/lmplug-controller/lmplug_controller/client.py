"""The worker side: :class:`ControllerClient` registers a worker with the controller, tells it
which chunks come and go, answers its commands, and asks it who holds a prompt's prefix.

The owner starts :meth:`ControllerClient.run` in its task group; nothing waits for the
controller. When the controller is down or restarts, the client logs it (once, then every
30 s), retries with backoff, learns the ZeroMQ endpoint again over HTTP, registers again and
sends a fresh snapshot. Lookups meanwhile are misses (``[]``), never errors.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import zmq
from anyio.abc import TaskGroup, TaskStatus

from lmplug_controller import PROTOCOL_VERSION
from lmplug_controller.protocol import (
    KEY_SIZE,
    SNAPSHOT_PART_KEYS,
    Holder,
    Kind,
    Message,
    ProtocolError,
    TierInfo,
    decode,
    encode,
    pack_keys,
)
from lmplug_controller.webclient import HttpStatusError, request_json, split_url
from lmplug_controller.zmqio import Channel

__all__ = ["ControllerClient", "Holder", "RegistrationRefused", "TierInfo"]

logger = logging.getLogger("lmplug.controller.client")

FLUSH_SECONDS = 0.05
"""Events are sent at least this often..."""
FLUSH_KEYS = 1024
"""...and as soon as this many keys are waiting."""
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 5.0
LOG_EVERY = 30.0
"""Seconds between two warnings that the controller is still unreachable."""
MISSED_ANSWERS = 3
"""Heartbeat intervals without a word from the controller before the client reconnects..."""
MIN_SILENCE = 1.0
"""...but never fewer seconds than this (short test intervals meet stalls of a loaded machine)."""

Snapshot = Callable[[], Awaitable[dict[str, list[bytes]]]]
OnCommand = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class RegistrationRefused(Exception):
    """The controller refused this worker (protocol version, token): retried, but logged as an error."""


@dataclass
class _Waiter:
    event: anyio.Event
    answer: Message | None = None


class ControllerClient:
    """A worker's link to the controller at ``url`` (``http://HOST:PORT``).

    :param snapshot: the keys each tier holds now (``{tier name: [key, ...]}``), sent after
        every (re)registration and whenever the controller lost track.
    :param on_command: runs a controller command ``(op, args) -> result``; ``args["keys"]``,
        when present, are ``bytes``. ``None``: commands are answered with an error.
    :param stats: optional; what heartbeats report, e.g. ``{"tiers": {"cpu": {"used_bytes": ...,
        "chunks": ..., "hits": ..., "misses": ...}}}`` (shown by ``/v1/instances`` and the dashboard).
    """

    def __init__(
        self,
        url: str,
        *,
        instance_id: str,
        fingerprint: bytes,
        rank: int,
        tiers: Sequence[TierInfo],
        endpoint: str,
        snapshot: Snapshot,
        on_command: OnCommand | None = None,
        token: str | None = None,
        heartbeat_seconds: float = 2.0,
        lookup_timeout: float = 0.2,
        stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        split_url(url)
        if len(fingerprint) != 8:
            raise ValueError(f"a fingerprint is 8 bytes, not {len(fingerprint)}")
        if heartbeat_seconds <= 0 or lookup_timeout <= 0:
            raise ValueError("heartbeat_seconds and lookup_timeout must be positive")
        self.url = url
        self.instance_id = instance_id
        self.fingerprint = fingerprint
        self.rank = rank
        self.tiers = tuple(tiers)
        self.endpoint = endpoint
        self.token = token
        self.heartbeat_seconds = heartbeat_seconds
        self.lookup_timeout = lookup_timeout
        self.incarnation = uuid.uuid4().hex
        """Who this client is since it was made: a new one means the worker's tiers started afresh."""
        self._snapshot = snapshot
        self._on_command = on_command
        self._report = stats
        self._ops: list[tuple[str, str, list[bytes]]] = []
        self._waiting_keys = 0
        self._seq = 0
        self._wanted_epoch = 0
        self._served_epoch = 0
        self._connected = False
        self._last_heard = 0.0
        self._channel: Channel | None = None
        self._group: TaskGroup | None = None
        self._registration: _Waiter | None = None
        self._lookups: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._flush_now: anyio.Event | None = None
        self._resync_wanted: anyio.Event | None = None
        self._lost: anyio.Event | None = None
        self._registered: anyio.Event | None = None
        self._lost_reason = ""
        self._troubled_since: float | None = None
        self._last_warning = 0.0
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "lookups",
                "lookup_hits",
                "lookup_failures",
                "events_sent",
                "event_batches",
                "events_dropped",
                "snapshots_sent",
                "snapshot_keys",
                "registrations",
                "reconnects",
                "commands",
                "command_failures",
            ),
            0,
        )

    # ------------------------------------------------------------------ the owner's API

    @property
    def connected(self) -> bool:
        """Registered, and the controller answered within the last few heartbeats."""
        return self._connected and time.monotonic() - self._last_heard <= self._silence_limit(self.heartbeat_seconds)

    async def wait_connected(self) -> None:
        """Return once the client is registered (at once if it is); bound it with a timeout."""
        if self._connected:
            return
        if self._registered is None:
            self._registered = anyio.Event()
        await self._registered.wait()

    def statistics(self) -> dict[str, int | float]:
        """Counters since the client was made, and ``connected`` (0 or 1)."""
        return {**self._counts, "connected": int(self.connected)}

    def admitted(self, tier: str, keys: Sequence[bytes]) -> None:
        """``tier`` now holds ``keys`` (queued; sent within about 50 ms)."""
        self._queue("+", tier, keys)

    def evicted(self, tier: str, keys: Sequence[bytes]) -> None:
        """``tier`` no longer holds ``keys`` (queued)."""
        self._queue("-", tier, keys)

    async def lookup(self, keys: Sequence[bytes]) -> list[Holder]:
        """Other instances holding a prefix of ``keys``, longest first; ``[]`` when the controller
        does not answer within ``lookup_timeout`` (a miss, never an exception)."""
        if not keys:
            return []
        self._counts["lookups"] += 1
        blob = pack_keys(keys)
        channel = self._channel
        if channel is None or not self._connected:
            self._counts["lookup_failures"] += 1
            return []
        request_id = next(self._ids)
        waiter = _Waiter(anyio.Event())
        self._lookups[request_id] = waiter
        try:
            if channel.send_nowait(encode(Kind.LOOKUP, {"id": request_id, "exclude": self.instance_id}, blob)):
                with anyio.move_on_after(self.lookup_timeout):
                    await waiter.event.wait()
        finally:
            del self._lookups[request_id]
        try:
            if waiter.answer is None:
                raise ProtocolError("no answer")
            holders = [Holder.from_json(holder) for holder in waiter.answer.meta.get("holders", [])]
        except ProtocolError:
            self._counts["lookup_failures"] += 1
            return []
        self._counts["lookup_hits"] += bool(holders)
        return holders

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the worker registered until cancelled; never raises for the controller's trouble."""
        self._flush_now = anyio.Event()
        context = zmq.Context()
        task_status.started()
        backoff = FIRST_BACKOFF
        try:
            while True:
                registrations = self._counts["registrations"]
                try:
                    await self._session(context)
                except Exception as exc:
                    self._trouble(exc)
                if self._counts["registrations"] != registrations:
                    backoff = FIRST_BACKOFF
                await anyio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            self._connected = False
            context.destroy(linger=0)

    # ------------------------------------------------------------------ one session

    async def _session(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        endpoint = await self._discover()
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            channel = Channel(sock)
            self._lost = anyio.Event()
            self._resync_wanted = anyio.Event()
            send_lock = anyio.Lock()
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(channel.pump, self._deliver)
                self._channel = channel
                heartbeat = await self._register(channel)
                group.start_soon(self._heartbeats, channel, heartbeat)
                group.start_soon(self._flushes, channel, send_lock)
                group.start_soon(self._resyncs, channel, send_lock, heartbeat)
                await self._lost.wait()
                group.cancel_scope.cancel()
            raise ConnectionError(self._lost_reason)
        finally:
            self._connected = False
            self._channel = None
            self._group = None
            self._registration = None
            for waiter in self._lookups.values():
                waiter.event.set()
            sock.close(linger=0)

    async def _discover(self) -> str:
        answer = await request_json(self.url, "GET", "/v1/endpoints", token=self.token, within=5.0)
        if not isinstance(answer, dict) or not isinstance(answer.get("zmq"), str):
            raise OSError(f"{self.url}/v1/endpoints did not name a ZeroMQ endpoint: {answer!r}")
        if answer.get("protocol") != PROTOCOL_VERSION:
            raise RegistrationRefused(
                f"the controller speaks protocol {answer.get('protocol')!r}, this client {PROTOCOL_VERSION}"
            )
        endpoint: str = answer["zmq"]
        scheme, _, address = endpoint.partition("://")
        host, _, port = address.rpartition(":")
        if host in ("0.0.0.0", "*", "[::]", "::"):  # a wildcard bind: reach it where HTTP was reached
            host = split_url(self.url)[0]
            endpoint = f"{scheme}://{host}:{port}"
        return endpoint

    async def _register(self, channel: Channel) -> float:
        """Register; the heartbeat interval to use. Raises when refused or unanswered."""
        self._registration = waiter = _Waiter(anyio.Event())
        meta = {
            "version": PROTOCOL_VERSION,
            "token": self.token,
            "instance_id": self.instance_id,
            "fingerprint": self.fingerprint.hex(),
            "rank": self.rank,
            "tiers": [tier.as_json() for tier in self.tiers],
            "endpoint": self.endpoint,
            "incarnation": self.incarnation,
        }
        await channel.send(encode(Kind.REGISTER, meta))
        limit = self._silence_limit(self.heartbeat_seconds)
        with anyio.move_on_after(limit):
            await waiter.event.wait()
        self._registration = None
        answer = waiter.answer
        if answer is None:
            raise TimeoutError(f"no answer to REGISTER within {limit:g} s")
        if answer.kind is Kind.ERROR:
            text = str(answer.meta.get("message", "refused"))
            if answer.meta.get("code") in ("version", "auth"):
                raise RegistrationRefused(text)
            raise ConnectionError(f"registration failed: {text}")
        heartbeat = min(self.heartbeat_seconds, float(answer.meta.get("heartbeat_seconds", self.heartbeat_seconds)))
        self._wanted_epoch, self._served_epoch = int(answer.meta.get("resync", 1)), 0
        self._counts["registrations"] += 1
        if self._counts["registrations"] > 1:
            self._counts["reconnects"] += 1
        self._connected = True
        if self._registered is not None:
            self._registered.set()
            self._registered = None
        if self._troubled_since is not None:
            logger.info(
                "lmplug controller at %s: registered again after %.1f s",
                self.url,
                time.monotonic() - self._troubled_since,
            )
            self._troubled_since = None
        assert self._resync_wanted is not None
        self._resync_wanted.set()
        return heartbeat

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            message = decode(frames)
        except ProtocolError as exc:
            logger.debug("lmplug controller: ignoring a malformed message: %s", exc)
            return
        self._last_heard = time.monotonic()
        kind, meta = message.kind, message.meta
        registration = self._registration
        if registration is not None and kind in (Kind.REGISTERED, Kind.ERROR):
            registration.answer = message
            registration.event.set()
        elif kind is Kind.LOOKUP_RESULT:
            waiter = self._lookups.get(meta.get("id", 0))
            if waiter is not None:
                waiter.answer = message
                waiter.event.set()
        elif kind in (Kind.ACK, Kind.RESYNC):
            epoch = meta.get("resync", 0)
            if isinstance(epoch, int) and epoch > self._served_epoch and self._resync_wanted is not None:
                self._wanted_epoch = max(self._wanted_epoch, epoch)
                self._resync_wanted.set()
        elif kind is Kind.COMMAND and self._group is not None:
            self._group.start_soon(self._command, meta)
        elif kind is Kind.ERROR:
            if meta.get("code") == "unregistered":
                self._lose("the controller does not know this worker (it restarted or dropped it)")
            else:
                logger.warning("lmplug controller: %s", meta.get("message"))

    @staticmethod
    def _silence_limit(interval: float) -> float:
        return max(MISSED_ANSWERS * interval, MIN_SILENCE)

    def _lose(self, reason: str) -> None:
        self._connected = False
        self._lost_reason = reason
        if self._lost is not None:
            self._lost.set()

    async def _heartbeats(self, channel: Channel, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            silent = time.monotonic() - self._last_heard
            if silent > self._silence_limit(interval):
                self._lose(f"no word from the controller for {silent:.1f} s")
                return
            stats: dict[str, Any] = {}
            if self._report is not None:
                try:
                    stats = self._report()
                except Exception:
                    logger.exception("lmplug controller: the stats callback failed")
            channel.send_nowait(encode(Kind.HEARTBEAT, {"seq": self._seq, "stats": stats}))

    def _queue(self, sign: str, tier: str, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        if any(len(key) != KEY_SIZE for key in keys):
            raise ValueError(f"chunk keys are {KEY_SIZE} bytes")
        if not self._connected:
            self._counts["events_dropped"] += len(keys)  # the snapshot after registering covers them
            return
        ops = self._ops
        if ops and ops[-1][0] == sign and ops[-1][1] == tier:
            ops[-1][2].extend(keys)
        else:
            ops.append((sign, tier, list(keys)))
        self._waiting_keys += len(keys)
        if self._waiting_keys >= FLUSH_KEYS and self._flush_now is not None:
            self._flush_now.set()

    async def _flushes(self, channel: Channel, send_lock: anyio.Lock) -> None:
        while True:
            flush_now = self._flush_now
            assert flush_now is not None
            with anyio.move_on_after(FLUSH_SECONDS):
                await flush_now.wait()
            if flush_now.is_set():
                self._flush_now = anyio.Event()
            if not self._ops:
                continue
            async with send_lock:
                ops, self._ops, self._waiting_keys = self._ops, [], 0
                if not ops:
                    continue
                seq = self._seq + 1
                blob = b"".join(b"".join(keys) for _, _, keys in ops)
                await channel.send(encode(Kind.EVENTS, {"seq": seq, "ops": [[s, t, len(k)] for s, t, k in ops]}, blob))
                self._seq = seq  # only now: a heartbeat must not name a batch still unsent
                self._counts["events_sent"] += len(blob) // KEY_SIZE
                self._counts["event_batches"] += 1

    async def _resyncs(self, channel: Channel, send_lock: anyio.Lock, interval: float) -> None:
        """Send a snapshot whenever the controller asks for one it has not had.

        Events queued before the snapshot is taken are dropped (the snapshot covers them); those
        queued while it is taken are sent after it, and replaying them on top is harmless: each
        key ends as its last event left it.
        """
        while True:
            assert self._resync_wanted is not None
            await self._resync_wanted.wait()
            self._resync_wanted = anyio.Event()
            epoch = self._wanted_epoch
            if epoch <= self._served_epoch:
                continue
            async with send_lock:
                self._ops, self._waiting_keys = [], 0
                try:
                    held = await self._snapshot()
                except Exception:
                    logger.exception("lmplug controller: the snapshot callback failed; trying again")
                    await anyio.sleep(interval)
                    self._resync_wanted.set()
                    continue
                self._served_epoch = epoch
                await channel.send(encode(Kind.SNAPSHOT_BEGIN, {"resync": epoch}))
                for tier, keys in held.items():
                    for start in range(0, len(keys), SNAPSHOT_PART_KEYS):
                        part = pack_keys(keys[start : start + SNAPSHOT_PART_KEYS])
                        await channel.send(encode(Kind.SNAPSHOT_KEYS, {"tier": tier}, part))
                    self._counts["snapshot_keys"] += len(keys)
                await channel.send(encode(Kind.SNAPSHOT_END, {"resync": epoch, "seq": self._seq}))
                self._counts["snapshots_sent"] += 1

    async def _command(self, meta: dict[str, Any]) -> None:
        self._counts["commands"] += 1
        op, args = meta.get("op"), meta.get("args")
        answer: dict[str, Any]
        if self._on_command is None:
            answer = {"ok": False, "error": "this worker takes no commands"}
        elif not isinstance(op, str) or not isinstance(args, dict):
            answer = {"ok": False, "error": "a command needs an op (str) and args (object)"}
        else:
            try:
                if "keys" in args:
                    args = {**args, "keys": [bytes.fromhex(key) for key in args["keys"]]}
                answer = {"ok": True, "result": await self._on_command(op, args)}
            except Exception as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if not answer["ok"]:
            self._counts["command_failures"] += 1
        channel = self._channel
        if channel is None:
            return
        try:
            frames = encode(Kind.COMMAND_RESULT, {"id": meta.get("id"), **answer})
        except (TypeError, ValueError) as exc:
            frames = encode(
                Kind.COMMAND_RESULT, {"id": meta.get("id"), "ok": False, "error": f"unsendable result: {exc}"}
            )
        channel.send_nowait(frames)

    def _trouble(self, exc: Exception) -> None:
        """Log that the controller cannot be had: the first time, then every :data:`LOG_EVERY` seconds."""
        now = time.monotonic()
        refused = isinstance(exc, RegistrationRefused)
        network = isinstance(exc, OSError | TimeoutError | ConnectionError | zmq.ZMQError | HttpStatusError)
        what = str(exc) or type(exc).__name__
        if self._troubled_since is None:
            self._troubled_since = self._last_warning = now
        elif now - self._last_warning < LOG_EVERY:
            return
        else:
            self._last_warning = now
            what = f"still, after {now - self._troubled_since:.0f} s: {what}"
        if refused:
            logger.error("lmplug controller at %s refused this worker: %s", self.url, what)
        elif network:
            logger.warning("lmplug controller at %s unreachable (retrying in the background): %s", self.url, what)
        else:
            logger.warning("lmplug controller at %s: unexpected error, retrying", self.url, exc_info=exc)
