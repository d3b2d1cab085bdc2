"""The command line of ``lmplug-server`` (and of ``lmplug server``, which lmplug-remote registers)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from lmplug_server import DEFAULT_PORT, TOKEN_ENV
from lmplug_server.protocol import Limits
from lmplug_server.server import LmServer, ServerConfig

__all__ = [
    "add_arguments",
    "config_from_arguments",
    "main",
    "parse_size",
    "run_from_arguments",
    "serve_until_signalled",
]

logger = logging.getLogger("lmplug.server")


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS = {"": 1, "b": 1, **_DECIMAL, **{unit + "b": size for unit, size in _DECIMAL.items()}, **_BINARY}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes from ``"4GiB"``, ``"512 MB"`` or ``"1048576"``; :class:`ValueError` for anything else."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; use bytes or a number with B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    size = float(match.group(1)) * _UNITS[unit]
    if size != int(size):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(size)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lmplug-server`` and ``lmplug server``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument("--capacity", type=_size, default="4GiB", help="memory for values, e.g. 4GiB (default)")
    parser.add_argument("--disk-path", type=Path, default=None, help="directory evicted values spill to (off)")
    parser.add_argument("--disk-capacity", type=_size, default="64GiB", help="bytes of spill files (default 64GiB)")
    parser.add_argument(
        "--auth-token", default=None, help=f"clients must send this token (default: ${TOKEN_ENV}; none if unset)"
    )
    parser.add_argument("--max-value", type=_size, default="256MiB", help="longest value accepted (default 256MiB)")
    parser.add_argument("--max-frame", type=_size, default="1GiB", help="longest request body (default 1GiB)")
    parser.add_argument("--max-keys", type=int, default=4096, help="most keys in one request (default 4096)")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT (off)"
    )
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds one request may take (60)")
    parser.add_argument(
        "--auth-deadline", type=float, default=5.0, help="with a token: seconds a connection may wait to AUTH (5)"
    )
    parser.add_argument(
        "--max-unauthenticated",
        type=int,
        default=256,
        help="with a token: connections waiting to AUTH at once; more are refused (256)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def config_from_arguments(args: argparse.Namespace) -> ServerConfig:
    token = args.auth_token if args.auth_token is not None else os.environ.get(TOKEN_ENV) or None
    if args.max_value > args.max_frame:
        raise ValueError(f"--max-value {args.max_value} exceeds --max-frame {args.max_frame}")
    return ServerConfig(
        host=args.host,
        port=args.port,
        capacity=args.capacity,
        disk_path=args.disk_path,
        disk_capacity=args.disk_capacity,
        auth_token=None if token is None else token.encode(),
        limits=Limits(max_value=args.max_value, max_frame=args.max_frame, max_keys=args.max_keys),
        metrics_port=args.metrics_port,
        request_timeout=args.request_timeout,
        auth_deadline=args.auth_deadline,
        max_unauthenticated=args.max_unauthenticated,
    )


async def serve_until_signalled(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT (a second one stops it at once)."""
    server = LmServer(config)
    async with anyio.create_task_group() as group:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("lmplug-server: %s, stopping", signal.Signals(signum).name)
                    server.shutdown()

        async def run(*, task_status: TaskStatus[tuple[str, int]]) -> None:
            await server.serve(task_status=task_status)
            group.cancel_scope.cancel()  # stopped: the signal watcher is done too

        group.start_soon(watch_signals)
        host, port = await group.start(run)
        metrics = "" if server.metrics_address is None else f", metrics on http://127.0.0.1:{server.metrics_address[1]}"
        capacity = f"{config.capacity / 2**30:.2f} GiB memory"
        if config.disk_path is not None:
            capacity += f", {config.disk_capacity / 2**30:.2f} GiB disk at {config.disk_path}"
        auth = "token required" if config.auth_token else "no auth"
        print(f"lmplug-server ready on lm://{host}:{port} ({capacity}; {auth}{metrics})", flush=True)


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the server the parsed arguments describe; the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_arguments(args)
    except ValueError as exc:
        print(f"lmplug-server: {exc}", file=sys.stderr)
        return 2
    backend = os.environ.get("LMPLUG_SERVER_BACKEND", "asyncio")
    try:
        anyio.run(serve_until_signalled, config, backend=backend)
    except OSError as exc:
        print(f"lmplug-server: cannot serve on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmplug-server`` console script."""
    parser = argparse.ArgumentParser(prog="lmplug-server", description="lmplug's shared KV store (lm:// URLs)")
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))
