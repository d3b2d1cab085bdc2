"""A long fuzz of the ``lm://`` protocol, both ways (``lmplug_server.fuzzing``), as a command.

- server frames: an ``lmplug-server`` process this benchmark starts (a token, small limits,
  on the backend being run) gets mutated frames, valid headers over random bodies, wrong
  lengths and key counts, cut and slow sends, bad tokens; every 500 frames it must still
  answer a well-behaved client, hold the values stored before unchanged, and have nothing
  reserved and no connection left open.
- client replies: lmplug-remote's ``LmConnector`` gets mutated replies from a hostile server;
  it must raise lmplug's errors or return what the bytes say, and never hang.

Half the cases go to each, split over the backends. How many: ``LMPLUG_FUZZ_CASES`` (default
100,000; 400 with ``--quick``); the seed: ``LMPLUG_FUZZ_SEED`` (default: a random one, shown
in the rows). The first thing found raises, naming the seed and the case, so the run fails;
otherwise the rows report cases, crashes and leaks (0) and cases per second (info).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import anyio

import lmplug
from benchmarks.harness import Result, Settings, Stats
from lmplug_remote.lm import LmOptions
from lmplug_remote.lm.connector import LmConnector
from lmplug_server.fuzzing import FUZZ_SERVER_ARGUMENTS, FuzzReport, fuzz_client, fuzz_server
from lmplug_server.testing import LmServerProcess

NAME = "fuzz_lm"
SUMMARY = "lm:// fuzz: frames to a live lmplug-server, replies to the connector; crashes and leaks must be 0 (info)"

CASES_ENV = "LMPLUG_FUZZ_CASES"
SEED_ENV = "LMPLUG_FUZZ_SEED"
CASES = 100_000
CASES_QUICK = 400
_TOKEN = b"fuzz-bench-token"


def _fuzz_live_server(backend: str, seed: int, cases: int) -> FuzzReport:
    with tempfile.TemporaryDirectory(prefix="lmplug-fuzz-") as directory:
        server = LmServerProcess(
            Path(directory), *FUZZ_SERVER_ARGUMENTS, "--auth-token", _TOKEN.decode(), "--log-level", "WARNING"
        )
        server.env["LMPLUG_SERVER_BACKEND"] = backend
        server.start()
        try:
            alive = lambda: server.process is not None and server.process.poll() is None  # noqa: E731
            return anyio.run(
                lambda: fuzz_server(server.port, seed=seed, cases=cases, token=_TOKEN, alive=alive), backend=backend
            )
        finally:
            server.kill()


def _fuzz_connector(backend: str, seed: int, cases: int) -> FuzzReport:
    refusals = (lmplug.TierUnavailable, lmplug.CorruptChunk)
    options = LmOptions(connections=1, connect_timeout=5.0)
    return anyio.run(
        lambda: fuzz_client(lambda url: LmConnector(url, options), refusals, seed=seed, cases=cases), backend=backend
    )


def _rows(what: str, backend: str, report: FuzzReport) -> list[Result]:
    case = f"{what}, seed {report.seed} [{backend}]"
    return [
        Result(NAME, f"{case}: cases", "cases", Stats.of([report.cases])),
        Result(NAME, f"{case}: crashes", "crashes", Stats.of([report.crashes])),
        Result(NAME, f"{case}: leaks", "leaks", Stats.of([report.leaks])),
        Result(NAME, f"{case}: rate", "cases/s", Stats.of([report.per_second])),
    ]


def run(settings: Settings) -> list[Result]:
    total = int(os.environ.get(CASES_ENV) or (CASES_QUICK if settings.quick else CASES))
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))
    share = max(1, total // (2 * len(settings.backends)))
    results: list[Result] = []
    for index, backend in enumerate(settings.backends):
        results += _rows("server frames", backend, _fuzz_live_server(backend, seed + 2 * index, share))
        results += _rows("client replies", backend, _fuzz_connector(backend, seed + 2 * index + 1, share))
    return results
