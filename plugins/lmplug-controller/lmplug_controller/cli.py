"""The command line of ``lmplug-controller`` (and of ``lmplug controller``, see :mod:`.command`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from lmplug_controller import DEFAULT_PORT, TOKEN_ENV
from lmplug_controller.server import Addresses, Controller, ControllerConfig

__all__ = ["add_arguments", "config_from_arguments", "main", "run_from_arguments", "serve_until_signalled"]

logger = logging.getLogger("lmplug.controller")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lmplug-controller`` and ``lmplug controller``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on, HTTP and ZeroMQ (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument(
        "--zmq-port", type=int, default=0, help="port of the workers' ZeroMQ socket (default 0: a free one)"
    )
    parser.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding the shared token (default {TOKEN_ENV}; unset or empty: no auth)",
    )
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between worker heartbeats (default 2.0)")
    parser.add_argument(
        "--missed-heartbeats", type=int, default=3, help="silent intervals before a worker is dropped (default 3)"
    )
    parser.add_argument(
        "--command-timeout", type=float, default=5.0, help="seconds a worker has to answer a command (default 5.0)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def config_from_arguments(args: argparse.Namespace) -> ControllerConfig:
    """:class:`ValueError` for values out of range."""
    return ControllerConfig(
        host=args.host,
        port=args.port,
        zmq_port=args.zmq_port,
        token=os.environ.get(args.token_env) or None,
        heartbeat_seconds=args.heartbeat,
        missed_heartbeats=args.missed_heartbeats,
        command_timeout=args.command_timeout,
    )


async def serve_until_signalled(config: ControllerConfig) -> None:
    """Run a controller until SIGTERM or SIGINT."""
    controller = Controller(config)
    async with anyio.create_task_group() as group:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("lmplug-controller: %s, stopping", signal.Signals(signum).name)
                    controller.shutdown()

        async def run(*, task_status: TaskStatus[Addresses]) -> None:
            await controller.serve(task_status=task_status)
            group.cancel_scope.cancel()

        group.start_soon(watch_signals)
        addresses = await group.start(run)
        auth = "token required" if config.token else "no auth"
        print(f"lmplug-controller ready on {addresses.url} (workers: {addresses.zmq}; {auth})", flush=True)


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the controller the parsed arguments describe; the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_arguments(args)
    except ValueError as exc:
        print(f"lmplug-controller: {exc}", file=sys.stderr)
        return 2
    backend = os.environ.get("LMPLUG_CONTROLLER_BACKEND", "asyncio")
    try:
        anyio.run(serve_until_signalled, config, backend=backend)
    except OSError as exc:
        print(f"lmplug-controller: cannot serve on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmplug-controller`` console script."""
    parser = argparse.ArgumentParser(
        prog="lmplug-controller", description="lmplug's controller: who holds which KV chunks, an HTTP API, a dashboard"
    )
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))
