"""PD push throughput (``lmplug-pd``'s ``pd`` tier) against a raw Python socket.

Geometry: chunks of 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk is
``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). A second process,
started here, is the prefill instance: a cache (``cpu`` + ``pd``) holding one prompt of 64 MiB
(16 MiB with ``--quick``). This process is the decode instance: a cache (``cpu`` + ``pd``) whose
receiver takes the pushes.

- push: on our command, the prefill process runs ``Cache.push`` of the whole prompt to our
  receiver (HELLO, OPEN, ACCEPT, one CHUNK per chunk sent with ``sendmsg`` from its pool, each
  hashed a chunk ahead; here each payload is received with ``recvmsg_into`` straight into a
  chunk of our pool, its header and xxh3 checked, the chunk admitted into our ``cpu`` tier; then
  DONE). Timed here, from the command to the answer. The received chunks are evicted after each
  sample, outside the timed section (``hold: 0``), so that the next push sends them all again.
- reference, same run, same two processes: one blocking socket in a worker thread, one chunk at
  a time: a 17-byte request, the prefill process's ``sendall`` of that chunk's bytes of the same
  KV tensor, our ``recv_into`` into region i of a preallocated prompt-sized buffer.

Target: push at >= 0.7x the raw socket. ``--quick``: 2 MiB chunks only.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import anyio

import lmplug
from benchmarks.harness import Backend, MiB, Result, Settings, Stopwatch, Target, run_per_backend, sample_async
from benchmarks.tier_cases import CHUNK_TOKENS, HEAD_SIZE, KV_HEADS, Case, thread_case
from lmplug.testing import make_config
from lmplug_pd.tier import PDTier

NAME = "pd_transfer"
SUMMARY = "PD push (lmplug-pd) of 2, 8, 32 MiB chunks from a prefill process's cache vs same-run raw socket (>= 0.7x)"

TARGET = Target(">=", 0.7, relative=True)
SAMPLE_BYTES = 64 * MiB
SAMPLE_BYTES_QUICK = 16 * MiB

_REQUEST = struct.Struct("<cQQ")
# The prefill instance: a cache holding the prompt; "push ENDPOINT ID" pushes it (answers the
# tokens pushed); a raw socket serves the same KV's bytes ("R"+offset+size) to the reference.
_PREFILL = """
import json, socket, struct, sys, threading
import anyio, torch, lmplug

config = json.loads(sys.argv[1])
tokens = list(range(int(sys.argv[2])))
model = config["model"]
kv = torch.randn((2, model["num_layers"], len(tokens), model["num_kv_heads"] * model["head_size"])).to(torch.bfloat16)
flat = kv.view(torch.uint8).reshape(-1).numpy().data

def raw_server(listener):
    request = struct.Struct("<cQQ")
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(request.size)
    while True:
        got = 0
        while got < len(head):
            n = connection.recv_into(memoryview(head)[got:])
            if not n:
                return
            got += n
        _, offset, size = request.unpack(head)
        connection.sendall(flat[offset : offset + size])

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_server, args=(listener,), daemon=True).start()
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, kv)
        print(listener.getsockname()[1], flush=True)
        while line := await anyio.to_thread.run_sync(sys.stdin.readline):
            _, endpoint, transfer_id = line.split()
            print(await cache.push(tokens, destination=endpoint, transfer_id=transfer_id, timeout=60), flush=True)

anyio.run(main)
"""


def _config(chunk_mib: int, cpu_bytes: int, **pd: Any) -> dict[str, Any]:
    tiers = [{"type": "cpu", "capacity": cpu_bytes}, {"type": "pd", **pd}]
    return make_config(
        tiers,
        chunk_size=CHUNK_TOKENS,
        num_layers=chunk_mib,
        num_kv_heads=KV_HEADS,
        head_size=HEAD_SIZE,
        dtype="bfloat16",
        save_partial_chunks=True,
    )


class _Prefill:
    """The prefill process, and the reference's blocking socket to it."""

    def __init__(self, config: dict[str, Any], chunks: int, chunk_mib: int) -> None:
        self.chunks = chunks
        self.chunk_bytes = chunk_mib * MiB
        self.memory = memoryview(bytearray(chunks * self.chunk_bytes))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PREFILL, json.dumps(config), str(chunks * CHUNK_TOKENS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.readline()
        if not line.isdigit():
            raise RuntimeError(f"the prefill process did not start: {line!r}")
        self.sock = socket.create_connection(("127.0.0.1", int(line)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()

    def readline(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def push(self, endpoint: str, transfer_id: str) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(f"push {endpoint} {transfer_id}\n")
        self.process.stdin.flush()
        return int(self.readline())

    def receive(self) -> float:
        with self._lock:
            start = time.perf_counter()
            for index in range(self.chunks):
                offset = index * self.chunk_bytes
                self.sock.sendall(_REQUEST.pack(b"R", offset, self.chunk_bytes))
                view = self.memory[offset : offset + self.chunk_bytes]
                got = 0
                while got < self.chunk_bytes:
                    received = self.sock.recv_into(view[got:])
                    if not received:
                        raise RuntimeError("the prefill process went away")
                    got += received
            return time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _push_case(prefill: _Prefill, decode: lmplug.Cache, endpoint: str, tokens: int) -> Case:
    prompt = list(range(tokens))
    transfers = iter(range(1 << 30))

    async def case() -> float:
        watch = Stopwatch()
        with watch:
            pushed = await anyio.to_thread.run_sync(prefill.push, endpoint, f"bench-{next(transfers)}")
        if pushed != tokens:
            raise RuntimeError(f"pushed {pushed} of {tokens} tokens")
        await anyio.sleep(0.01)  # the hold (0 s) ends
        await decode.evict(prompt)
        return watch.elapsed

    return case


async def _measure_size(chunk_mib: int, settings: Settings, backend: Backend) -> list[Result]:
    chunks = max(1, (SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES) // (chunk_mib * MiB))
    sample_bytes = chunks * chunk_mib * MiB
    room = sample_bytes + 2 * chunk_mib * MiB
    async with lmplug.open_cache(_config(chunk_mib, room, hold=0, max_inflight=room)) as decode:
        endpoint = next(slot.tier for slot in decode.pipeline.slots if isinstance(slot.tier, PDTier)).endpoint
        prefill = await anyio.to_thread.run_sync(_Prefill, _config(chunk_mib, room), chunks, chunk_mib)
        try:
            cases: dict[str, Case] = {
                "raw recv": thread_case(prefill.receive),
                "push": _push_case(prefill, decode, endpoint, chunks * CHUNK_TOKENS),
            }
            stats = await sample_async(cases, settings)
        finally:
            await anyio.to_thread.run_sync(prefill.close)
    rates = {name: value.inverted(sample_bytes / MiB) for name, value in stats.items()}
    label = f"{chunk_mib} MiB x{chunks} [{backend}]"
    return [Result(NAME, f"push {label}", "MiB/s", rates["push"], TARGET, rates["raw recv"], "raw socket")]


async def _main(settings: Settings, backend: Backend) -> list[Result]:
    results: list[Result] = []
    for chunk_mib in (2,) if settings.quick else (2, 8, 32):
        results += await _measure_size(chunk_mib, settings, backend)
    return results


def run(settings: Settings) -> list[Result]:
    return run_per_backend(_main, settings)
