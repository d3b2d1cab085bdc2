"""The HTTP API (h11 on anyio): JSON for people and scripts, ``/metrics`` for Prometheus, and
the dashboard page. Commands are forwarded to the instance's workers over ZeroMQ.
"""

from __future__ import annotations

import functools
import hmac
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import anyio
import h11
from anyio.abc import ByteStream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmplug_controller import PROTOCOL_VERSION, httpserver
from lmplug_controller.httpserver import HttpError, Response
from lmplug_controller.protocol import ProtocolError, parse_hex_keys
from lmplug_controller.server import CommandTimeout, Controller, UnknownInstance

__all__ = ["serve_connection"]

MAX_BODY = 16 << 20
"""Longest request body (a lookup of 512 keys is about 26 KB)."""
IDLE_SECONDS = 60.0
"""A kept-alive connection with no new request for this long is closed."""
_JSON = "application/json"


async def serve_connection(controller: Controller, stream: ByteStream) -> None:
    """Answer the requests of one connection (keep-alive) until it closes or idles."""
    await httpserver.serve_connection(
        stream,
        functools.partial(_answer, controller),
        error=lambda status, message: _json(status, {"error": message}),
        max_body=MAX_BODY,
        idle_seconds=IDLE_SECONDS,
    )


def _reply(status: int, kind: str, body: bytes) -> Response:
    return Response(status, [("content-type", kind), ("cache-control", "no-store")], body)


def _json(status: int, value: Any) -> Response:
    return _reply(status, _JSON, json.dumps(value, separators=(",", ":")).encode())


# ---------------------------------------------------------------------- routing

Handler = Callable[[Controller, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _answer(controller: Controller, request: h11.Request, body: bytes) -> Response:
    method = request.method.decode()
    path = urllib.parse.urlsplit(request.target.decode()).path
    if method == "GET" and path in ("/", "/index.html"):
        return _reply(200, "text/html; charset=utf-8", _dashboard())
    if method == "GET" and path == "/healthz":
        return _json(200, {"ok": True, "workers": len(controller.index.workers())})
    _authorize(controller, request)
    if method == "GET":
        if path == "/metrics":
            return _reply(200, CONTENT_TYPE_LATEST, generate_latest(controller.registry))
        if path == "/v1/endpoints":
            return _json(200, _endpoints(controller))
        if path == "/v1/instances":
            return _json(200, {"instances": controller.instances()})
        if path.startswith("/v1/instances/"):
            instance_id = urllib.parse.unquote(path[len("/v1/instances/") :])
            for instance in controller.instances():
                if instance["instance_id"] == instance_id:
                    return _json(200, instance)
            raise HttpError(404, f"no instance {instance_id!r} is registered")
    handler = _POSTS.get(path)
    if handler is None:
        raise HttpError(404, f"no such endpoint: {method} {path}")
    if method != "POST":
        raise HttpError(405, f"{path} takes POST")
    try:
        arguments = json.loads(body or b"{}")
    except ValueError as exc:
        raise HttpError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise HttpError(400, "the body must be a JSON object")
    try:
        return _json(200, await handler(controller, arguments))
    except UnknownInstance as exc:
        raise HttpError(404, str(exc)) from None
    except CommandTimeout as exc:
        raise HttpError(504, str(exc)) from None
    except ProtocolError as exc:
        raise HttpError(400, str(exc)) from None


def _authorize(controller: Controller, request: h11.Request) -> None:
    token = controller.config.token
    if token is None:
        return
    offered = dict(request.headers).get(b"authorization", b"")
    if not hmac.compare_digest(offered, b"Bearer " + token.encode()):
        raise HttpError(401, "a valid 'Authorization: Bearer <token>' header is required")


@functools.cache
def _dashboard() -> bytes:
    return resources.files("lmplug_controller").joinpath("dashboard.html").read_bytes()


def _endpoints(controller: Controller) -> dict[str, Any]:
    addresses = controller.addresses
    return {
        "zmq": None if addresses is None else addresses.zmq,
        "protocol": PROTOCOL_VERSION,
        "heartbeat_seconds": controller.config.heartbeat_seconds,
    }


# ---------------------------------------------------------------------- POST bodies


def _string(arguments: dict[str, Any], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{name!r} must be a non-empty string")
    return value


def _worker_arguments(arguments: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """What a command sends on to the workers: ``arguments`` less ``instance_id``, checked."""
    unknown = set(arguments) - allowed - {"instance_id"}
    if unknown:
        raise ProtocolError(
            f"unknown field(s) {sorted(unknown)}; this endpoint takes {sorted(allowed | {'instance_id'})}"
        )
    forwarded = {name: value for name, value in arguments.items() if name != "instance_id"}
    if "keys" in forwarded:
        parse_hex_keys(forwarded["keys"])
    tiers = forwarded.get("tiers")
    if tiers is not None and not (isinstance(tiers, list) and all(isinstance(tier, str) for tier in tiers)):
        raise ProtocolError("'tiers' must be a list of tier names")
    ttl = forwarded.get("ttl_s")
    if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
        raise ProtocolError("'ttl_s' must be a positive number of seconds")
    return forwarded


async def _to_instance(controller: Controller, instance_id: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Send ``op`` to every worker of the instance at once; their answers, by rank."""
    workers = controller.workers_of(instance_id)
    answers: list[dict[str, Any]] = [{} for _ in workers]
    late: list[str] = []

    async def ask(position: int) -> None:
        worker = workers[position]
        try:
            answer = await controller.command(worker, op, args)
        except CommandTimeout as exc:
            late.append(str(exc))
            return
        answers[position] = {"rank": worker.rank, "fingerprint": worker.fingerprint.hex(), **answer}

    async with anyio.create_task_group() as group:
        for position in range(len(workers)):
            group.start_soon(ask, position)
    if late:
        raise CommandTimeout("; ".join(late))
    return {"instance_id": instance_id, "ok": all(answer["ok"] for answer in answers), "workers": answers}


async def _lookup(controller: Controller, arguments: dict[str, Any]) -> dict[str, Any]:
    keys = parse_hex_keys(arguments.get("keys"))
    exclude = arguments.get("exclude_instance")
    if exclude is not None and not isinstance(exclude, str):
        raise ProtocolError("'exclude_instance' must be a string")
    holders = controller.lookup(keys, exclude)
    return {"chunks": len(keys), "holders": [holder.as_json() for holder in holders]}


def _command(op: str, allowed: frozenset[str]) -> Handler:
    async def handler(controller: Controller, arguments: dict[str, Any]) -> dict[str, Any]:
        instance_id = _string(arguments, "instance_id")
        return await _to_instance(controller, instance_id, op, _worker_arguments(arguments, allowed))

    return handler


async def _move(controller: Controller, arguments: dict[str, Any]) -> dict[str, Any]:
    """The destination's workers fetch the keys from the source's worker of the same fingerprint
    (same model, config and rank), then, unless ``copy``, the source's workers drop them."""
    unknown = set(arguments) - {"from", "to", "keys", "copy"}
    if unknown:
        raise ProtocolError(f"unknown field(s) {sorted(unknown)}; /v1/move takes from, to, keys, copy")
    source, destination = _string(arguments, "from"), _string(arguments, "to")
    if source == destination:
        raise ProtocolError("'from' and 'to' name the same instance")
    copy = arguments.get("copy", False)
    if not isinstance(copy, bool):
        raise ProtocolError("'copy' must be true or false")
    keys = parse_hex_keys(arguments.get("keys"))
    sources = {worker.fingerprint: worker for worker in controller.workers_of(source)}
    pairs = []
    for target in controller.workers_of(destination):
        mine = [key.hex() for key in keys if key[:8] == target.fingerprint]
        if mine and target.fingerprint in sources:
            pairs.append((sources[target.fingerprint], target, mine))
    if not pairs:
        raise ProtocolError(f"no key belongs to a (model, config, rank) that both {source!r} and {destination!r} serve")
    answers: list[dict[str, Any]] = []
    for giver, taker, mine in pairs:
        fetched = await controller.command(
            taker, "fetch", {"from_instance": source, "endpoint": giver.endpoint, "keys": mine}
        )
        cleared = None
        if fetched["ok"] and not copy:
            cleared = await controller.command(giver, "clear", {"keys": mine})
        answers.append({"rank": taker.rank, "keys": len(mine), "fetch": fetched, "clear": cleared})
    ok = all(answer["fetch"]["ok"] and (copy or answer["clear"]["ok"]) for answer in answers)
    return {"from": source, "to": destination, "copy": copy, "ok": ok, "workers": answers}


async def _health(controller: Controller, arguments: dict[str, Any]) -> dict[str, Any]:
    instance_id = _string(arguments, "instance_id")
    answer = await _to_instance(controller, instance_id, "health", _worker_arguments(arguments, frozenset()))
    descriptions = {
        worker.fingerprint.hex(): controller.describe(worker) for worker in controller.workers_of(instance_id)
    }
    for worker in answer["workers"]:
        description = descriptions.get(worker["fingerprint"], {})
        worker["connected"] = description.get("connected", False)
        worker["last_heartbeat_seconds_ago"] = description.get("last_heartbeat_seconds_ago")
    return answer


_POSTS: dict[str, Handler] = {
    "/v1/lookup": _lookup,
    "/v1/clear": _command("clear", frozenset({"tiers", "keys"})),
    "/v1/pin": _command("pin", frozenset({"keys", "ttl_s", "tiers"})),
    "/v1/unpin": _command("unpin", frozenset({"keys", "pin_id"})),
    "/v1/move": _move,
    "/v1/health": _health,
}
