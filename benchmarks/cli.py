"""The command line: run the selected benchmarks, print one table, optionally save JSON.

The exit status is 0 whether or not targets are met (a MISS is a finding, not a failure);
it is 1 only when a benchmark itself breaks (an exception), and 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch

from benchmarks import (
    connector_copy,
    controller_index,
    cpu_throughput,
    disk_restart,
    disk_throughput,
    fixed_cost,
    fuzz_lm,
    lookup_128k,
    p2p_transfer,
    pd_transfer,
    remote_codecs,
    remote_lm,
    remote_redis,
    remote_s3,
    sync_overhead,
    vllm_blend,
    vllm_chat,
    vllm_pd,
    vllm_ttft,
)
from benchmarks.harness import Backend, Result, Settings, format_table, write_json

MODULES: tuple[ModuleType, ...] = (
    cpu_throughput,
    fixed_cost,
    lookup_128k,
    controller_index,
    sync_overhead,
    disk_throughput,
    disk_restart,
    remote_redis,
    remote_s3,
    remote_lm,
    fuzz_lm,
    remote_codecs,
    p2p_transfer,
    pd_transfer,
    connector_copy,
    vllm_ttft,
    vllm_chat,
    vllm_pd,
    vllm_blend,
)


def _registry() -> dict[str, tuple[str, Callable[[Settings], list[Result]]]]:
    return {module.NAME: (module.SUMMARY, module.run) for module in MODULES}


def _parser(names: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="lmplug benchmarks; prints median, spread and PASS/MISS against each target.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(names)})"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (smaller sizes, fewer loops)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--repeats", type=int, default=None, help="samples per case, >= 5 (default 7; 5 with --quick)")
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio", "all"),
        default="all",
        help="event loop(s) for the async benchmarks (default: all)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op threads for the run (default 1: steadier copies on shared VMs; 0 keeps torch's default)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": version("numpy"),
        "lmplug": version("lmplug"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    registry = _registry()
    parser = _parser(list(registry))
    args = parser.parse_args(argv)
    if args.list:
        for name, (summary, _) in registry.items():
            print(f"{name:16} {summary}")
        return 0
    unknown = [name for name in args.names if name not in registry]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    choice: str = args.backend
    backends: tuple[Backend, ...] = ("asyncio", "trio") if choice == "all" else (cast(Backend, choice),)
    try:
        settings = Settings(
            quick=args.quick,
            repeats=args.repeats or (5 if args.quick else 7),
            warmup=1 if args.quick else 2,
            backends=backends,
        )
    except ValueError as exc:
        parser.error(str(exc))

    if args.threads < 0:
        parser.error("--threads must be >= 0")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args.names or list(registry), settings, args.json)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def _run(selected: Sequence[str], settings: Settings, json_path: Path | None) -> int:
    registry = _registry()
    results: list[Result] = []
    failed: list[str] = []
    started = time.perf_counter()
    for name in dict.fromkeys(selected):
        _, run = registry[name]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        try:
            results += run(settings)
        except Exception:
            failed.append(name)
            traceback.print_exc()
        print(f"  {name}: {time.perf_counter() - begin:.1f} s", file=sys.stderr, flush=True)

    mode = "quick" if settings.quick else "full"
    print(
        f"\nlmplug benchmarks ({mode}; {settings.repeats} samples after {settings.warmup} warm-up; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} intra-op threads; "
        f"{time.perf_counter() - started:.1f} s)\n"
    )
    print(format_table(results))
    if failed:
        print(f"\nFAILED to run: {', '.join(failed)}")
    if json_path is not None:
        write_json(json_path, results, settings, _environment())
        print(f"\nresults saved to {json_path}")
    return 1 if failed else 0
