"""The controller's index (lmplug-controller): longest-prefix lookup and event ingestion.

Lookup: a 128k-token prompt (512 keys of 256 tokens) against 8 instances (2 tiers each) and
1M indexed chunks; the prompt's prefix is held by every instance, at lengths 512, 480, ...,
288, so that the walk visits every key with 8 holders live. Reference: a bare loop of dict
membership tests of the same keys in the index's own dict.

Ingestion: EVENTS messages of 1024 keys (admitted, then the same keys evicted, so the index
keeps its size) through ``Controller.handle``, what the ZeroMQ pump calls for each message
(JSON meta, unpacking the keys, sequence checks, the index update); the index update alone
(``Index.admit``/``evict`` of unpacked keys); and, as info, the whole path from
``ControllerClient.admitted`` over ZeroMQ on loopback to the controller's index. Reference: a
bare Python dict insert and delete of the same keys.

Targets: lookup <= 5 ms; ingestion >= 100k chunks/s.
"""

from __future__ import annotations

import functools
import hashlib
import time

import anyio

from benchmarks.harness import Backend, Result, Settings, Stats, Target, per_call, sample_async, sample_sync
from lmplug_controller.protocol import Kind, TierInfo, encode
from lmplug_controller.server import Controller, ControllerConfig
from lmplug_controller.testing import eventually, running_controller

NAME = "controller_index"
SUMMARY = "controller: 128k-token lookup over 1M chunks (<= 5 ms), event ingestion (>= 100k chunks/s)"

INSTANCES = 8
PROMPT_KEYS = 512
BATCH = 1024
LOOKUP_TARGET = Target("<=", 5.0)
INGEST_TARGET = Target(">=", 100_000.0)
TIERS = (TierInfo("cpu", "cpu", 64 << 30), TierInfo("disk", "disk", 1 << 40))
FINGERPRINT = b"bench-fp"


def _keys(name: str, count: int) -> list[bytes]:
    seed = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return [
        FINGERPRINT + hashlib.blake2b(seed + i.to_bytes(4, "little"), digest_size=16).digest() for i in range(count)
    ]


def _register(controller: Controller, route: bytes, instance_id: str) -> None:
    meta = {
        "version": 1,
        "token": None,
        "instance_id": instance_id,
        "fingerprint": FINGERPRINT.hex(),
        "rank": 0,
        "tiers": [tier.as_json() for tier in TIERS],
        "endpoint": f"10.0.0.1:{7000}/{instance_id}",
        "incarnation": "1",
    }
    controller.handle([route, *encode(Kind.REGISTER, meta)])
    controller.handle([route, *encode(Kind.SNAPSHOT_BEGIN, {"resync": 1})])
    controller.handle([route, *encode(Kind.SNAPSHOT_END, {"resync": 1, "seq": 0})])


def _sync_results(settings: Settings) -> list[Result]:
    total = 100_000 if settings.quick else 1_000_000
    batches = 20 if settings.quick else 100
    controller = Controller(ControllerConfig(port=0))
    index = controller.index
    prompt = _keys("prompt", PROMPT_KEYS)
    for number in range(INSTANCES):
        instance = f"instance-{number}"
        _register(controller, f"route-{number}".encode(), instance)
        worker = index.of_instance(instance)[0]
        held = PROMPT_KEYS - 32 * number
        index.admit(worker, "cpu", prompt[:held])
        if number % 2:
            index.admit(worker, "disk", prompt[:held])
        index.admit(worker, "cpu", _keys(instance, total // INSTANCES - held))
    masks = index._masks  # the reference probes the index's own dict
    if index.lookup(prompt)[0].chunks != PROMPT_KEYS:
        raise RuntimeError("the lookup missed")
    calls = 20 if settings.quick else 100

    def lookup() -> float:
        return per_call(lambda: index.lookup(prompt, exclude_instance="nobody"), calls)

    def membership() -> float:
        return per_call(lambda: sum(key in masks for key in prompt), calls)

    # Ingestion: a ninth worker admits and evicts fresh keys in batches of 1024.
    route = b"route-ingest"
    _register(controller, route, "ingest")
    worker = index.of_instance("ingest")[0]
    churn = [_keys(f"churn-{n}", BATCH) for n in range(batches)]
    blobs = [b"".join(keys) for keys in churn]
    sequence = [0]

    def through_handle() -> float:
        frames = []
        for blob in blobs:
            for sign in ("+", "-"):
                sequence[0] += 1
                meta = {"seq": sequence[0], "ops": [[sign, "cpu", BATCH]]}
                frames.append([route, *encode(Kind.EVENTS, meta, blob)])  # what arrives off the socket
        start = time.perf_counter()
        for message in frames:
            controller.handle(message)
        elapsed = time.perf_counter() - start
        return elapsed / (2 * BATCH * batches)

    def index_only() -> float:
        start = time.perf_counter()
        for keys in churn:
            index.admit(worker, "cpu", keys)
            index.evict(worker, "cpu", keys)
        return (time.perf_counter() - start) / (2 * BATCH * batches)

    def bare_dict() -> float:
        plain: dict[bytes, int] = {}
        start = time.perf_counter()
        for keys in churn:
            for key in keys:
                plain[key] = 1
            for key in keys:
                del plain[key]
        return (time.perf_counter() - start) / (2 * BATCH * batches)

    stats = sample_sync(
        {
            "lookup": lookup,
            "membership": membership,
            "handle": through_handle,
            "index": index_only,
            "dict": bare_dict,
        },
        settings,
    )
    if controller.counters.gaps or index.chunks(worker)["cpu"]:
        raise RuntimeError("ingestion lost track")
    indexed = f"{len(index) // 1000}k chunks"
    lookup_ms, membership_ms = stats["lookup"].scaled(1e3), stats["membership"].scaled(1e3)
    rates = {name: stats[name].inverted(1.0) for name in ("handle", "index", "dict")}
    return [
        Result(
            NAME,
            f"lookup 512 keys, {INSTANCES} holders, {indexed}",
            "ms",
            lookup_ms,
            LOOKUP_TARGET,
            membership_ms,
            "dict probes",
        ),
        Result(NAME, f"dict membership, 512 keys, {indexed} (reference)", "ms", membership_ms),
        Result(
            NAME,
            "events via Controller.handle, 1024-key batches",
            "chunks/s",
            rates["handle"],
            INGEST_TARGET,
            rates["dict"],
            "bare dict",
        ),
        Result(
            NAME, "events, index update alone", "chunks/s", rates["index"], INGEST_TARGET, rates["dict"], "bare dict"
        ),
        Result(NAME, "bare dict insert + delete (reference)", "chunks/s", rates["dict"]),
    ]


async def _zmq_results(settings: Settings, backend: Backend) -> list[Result]:
    """Keys from ``ControllerClient.admitted`` to the controller's index, over ZeroMQ on loopback."""
    from lmplug_controller.testing import MemoryWorker, running_worker

    batches = 10 if settings.quick else 50
    churn = [_keys(f"zmq-{n}", BATCH) for n in range(batches)]
    async with running_controller(heartbeat_seconds=1.0) as controller:
        url = controller.addresses.url  # type: ignore[union-attr]
        async with running_worker(MemoryWorker(url, "bench", fingerprint=FINGERPRINT)) as worker:
            client, counters = worker.client, controller.counters
            record = controller.index.find("bench", FINGERPRINT)
            await eventually(lambda: record is not None and not record.dirty)  # events before it are dropped

            async def end_to_end() -> float:
                target = counters.admitted + counters.evicted + 2 * BATCH * batches
                start = time.perf_counter()
                for keys in churn:
                    client.admitted("cpu", keys)
                    client.evicted("cpu", keys)
                    await anyio.lowlevel.checkpoint()
                await eventually(lambda: counters.admitted + counters.evicted >= target, within=60, step=0.001)
                return (time.perf_counter() - start) / (2 * BATCH * batches)

            stats = await sample_async({"zmq": end_to_end}, settings)
    rate: Stats = stats["zmq"].inverted(1.0)
    return [Result(NAME, f"events end to end over ZeroMQ (client to index) [{backend}]", "chunks/s", rate)]


def run(settings: Settings) -> list[Result]:
    results = _sync_results(settings)
    backend = settings.backends[0]
    results += anyio.run(functools.partial(_zmq_results, settings, backend), backend=backend)
    return results
