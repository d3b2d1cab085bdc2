"""Shared pieces of the benchmarks: settings, sampling, results, the table and the JSON file.

Method: every measured case is warmed up, then sampled ``repeats`` times (at least 5);
samples of the cases of one benchmark are taken in interleaved rounds so that drift of
the machine (frequency, other load) hits the subject and its reference alike. A result
reports the median and the spread (half the min-to-max range, relative to the median).
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

Backend = Literal["asyncio", "trio"]
MIN_REPEATS = 5

Status = Literal["PASS", "MISS", "info"]


@dataclass(frozen=True, slots=True)
class Settings:
    """How hard to measure: ``quick`` shrinks sizes and loop counts for a smoke run."""

    quick: bool = False
    repeats: int = 7
    warmup: int = 2
    backends: tuple[Backend, ...] = ("asyncio", "trio")

    def __post_init__(self) -> None:
        if self.repeats < MIN_REPEATS:
            raise ValueError(f"repeats must be at least {MIN_REPEATS}, not {self.repeats}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be at least 1, not {self.warmup}")
        if not self.backends:
            raise ValueError("at least one backend is needed")


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of the samples of one measured quantity."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    @property
    def spread(self) -> float:
        """Half the min-to-max range relative to the median (0.05 = +/-5 %)."""
        return (self.high - self.low) / 2 / self.median if self.median else 0.0

    def scaled(self, factor: float) -> Stats:
        """The same samples times ``factor`` (e.g. seconds to microseconds)."""
        return Stats.of([sample * factor for sample in self.samples])

    def inverted(self, numerator: float) -> Stats:
        """``numerator / sample`` for every sample (e.g. seconds per call to bytes per second)."""
        return Stats.of([numerator / sample for sample in self.samples])


@dataclass(frozen=True, slots=True)
class Target:
    """``op bound``: absolute in the result's unit, or (``relative``) a ratio to the reference."""

    op: Literal[">=", "<="]
    bound: float
    relative: bool = False

    def met(self, ratio: float) -> bool:
        """Whether the ratio (value/reference when relative, value/bound otherwise) meets the target."""
        limit = self.bound if self.relative else 1.0
        return ratio >= limit if self.op == ">=" else ratio <= limit


@dataclass(frozen=True, slots=True)
class Result:
    """One row of the table."""

    benchmark: str
    case: str
    unit: str
    value: Stats
    target: Target | None = None
    reference: Stats | None = None
    reference_name: str = ""

    @property
    def ratio(self) -> float | None:
        """value/reference for relative targets, value/bound for absolute ones, value/reference for info rows."""
        if self.target is not None and not self.target.relative:
            return self.value.median / self.target.bound
        if self.reference is not None and self.reference.median:
            return self.value.median / self.reference.median
        return None

    @property
    def status(self) -> Status:
        ratio = self.ratio
        if self.target is None or ratio is None:
            return "info"
        return "PASS" if self.target.met(ratio) else "MISS"

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.target.relative:
            return f"{self.target.op} {self.target.bound:g}x {self.reference_name}".rstrip()
        return f"{self.target.op} {self.target.bound:g} {self.unit}"

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "case": self.case,
            "unit": self.unit,
            "median": self.value.median,
            "min": self.value.low,
            "max": self.value.high,
            "spread": self.value.spread,
            "samples": list(self.value.samples),
            "reference_name": self.reference_name or None,
            "reference_median": None if self.reference is None else self.reference.median,
            "reference_spread": None if self.reference is None else self.reference.spread,
            "ratio": self.ratio,
            "target": self.target_text() or None,
            "status": self.status,
        }


# ---------------------------------------------------------------------------- sampling

AsyncSample = Callable[[], Awaitable[float]]
SyncSample = Callable[[], float]


async def sample_async(cases: Mapping[str, AsyncSample], settings: Settings) -> dict[str, Stats]:
    """Warm every case up, then take ``settings.repeats`` interleaved rounds of samples.

    A case returns one sample (usually seconds per operation, timed by the case itself so that
    it can leave set-up work such as evictions out).
    """
    for _ in range(settings.warmup):
        for case in cases.values():
            await case()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(settings.repeats):
        for name, case in cases.items():
            samples[name].append(await case())
    return {name: Stats.of(values) for name, values in samples.items()}


def run_per_backend(main: Callable[[Settings, Backend], Awaitable[list[Result]]], settings: Settings) -> list[Result]:
    """Run an async benchmark once on each requested event loop and gather its results."""
    results: list[Result] = []
    for backend in settings.backends:
        results += anyio.run(functools.partial(main, settings, backend), backend=backend)
    return results


def sample_sync(cases: Mapping[str, SyncSample], settings: Settings) -> dict[str, Stats]:
    """:func:`sample_async` for blocking cases."""
    for _ in range(settings.warmup):
        for case in cases.values():
            case()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(settings.repeats):
        for name, case in cases.items():
            samples[name].append(case())
    return {name: Stats.of(values) for name, values in samples.items()}


def per_call(function: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``function``, over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


async def per_call_async(function: Callable[[], Awaitable[object]], calls: int) -> float:
    """Seconds per awaited call of ``function``, over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        await function()
    return (time.perf_counter() - start) / calls


@dataclass(slots=True)
class Stopwatch:
    """Accumulates only the timed sections: ``with watch: ...`` around what counts."""

    elapsed: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed += time.perf_counter() - self._start


MiB = 1024**2
GiB = 1024**3


# ---------------------------------------------------------------------------- output

_COLUMNS = ("benchmark", "case", "median", "spread", "reference", "ratio", "target", "result")


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cells(result: Result) -> tuple[str, ...]:
    ratio = result.ratio
    reference = ""
    if result.reference is not None:
        reference = f"{result.reference_name} {_number(result.reference.median)}".strip()
    return (
        result.benchmark,
        result.case,
        f"{_number(result.value.median)} {result.unit}",
        f"+/-{result.value.spread * 100:.0f}%",
        reference,
        "" if ratio is None else f"{ratio:.2f}",
        result.target_text(),
        result.status,
    )


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table of ``results`` with a legend."""
    rows = [_COLUMNS, *(_cells(result) for result in results)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    legend = (
        "ratio: value/reference for targets relative to a reference (and info rows with one); "
        "value/bound for absolute targets (<= 1.00 meets a '<=' bound). "
        "spread: half the min-max range of the samples, relative to the median."
    )
    return "\n".join([*lines, "", legend])


def write_json(path: Path, results: Sequence[Result], settings: Settings, environment: Mapping[str, Any]) -> None:
    document = {
        "settings": {
            "quick": settings.quick,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "backends": list(settings.backends),
        },
        "environment": dict(environment),
        "results": [result.as_json() for result in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
