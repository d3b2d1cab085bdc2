"""The command line of ``lmplug-pd-proxy`` (and of ``lmplug pd-proxy``, see :mod:`.command`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from lmplug_pd.proxy import DEFAULT_PORT, Proxy, ProxyConfig, base_url

__all__ = [
    "BACKEND_ENV",
    "add_arguments",
    "config_from_arguments",
    "main",
    "run_from_arguments",
    "serve_until_signalled",
]

logger = logging.getLogger("lmplug.pd.proxy")

BACKEND_ENV = "LMPLUG_PD_PROXY_BACKEND"
"""The event loop the command runs on: ``asyncio`` (the default) or ``trio``."""
_DEFAULTS = ProxyConfig(prefill=("http://127.0.0.1:8001",), decode=("http://127.0.0.1:8002",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lmplug-pd-proxy`` and ``lmplug pd-proxy``."""
    instances = "URL[,URL...]"
    parser.add_argument(
        "--prefill",
        action="append",
        required=True,
        metavar=instances,
        help="prefill instances (vLLM's http://HOST:PORT); comma-separated or repeated",
    )
    parser.add_argument(
        "--decode",
        action="append",
        required=True,
        metavar="URL[=RECEIVER][,...]",
        help="decode instances (vLLM's http://HOST:PORT), each with its PD receiver (HOST:PORT of the "
        "'pd' tier in its lmplug stack) after '=', where prefills push the KV; comma-separated or repeated",
    )
    parser.add_argument("--host", default=_DEFAULTS.host, help=f"address to listen on (default {_DEFAULTS.host})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    seconds = (
        ("--connect-timeout", _DEFAULTS.connect_timeout, "seconds to connect to an instance"),
        ("--prefill-timeout", _DEFAULTS.prefill_timeout, "seconds the prefill leg may take before the fallback"),
        (
            "--decode-timeout",
            _DEFAULTS.decode_timeout,
            "seconds a decode instance may stay silent (before and while answering)",
        ),
        ("--push-deadline", _DEFAULTS.push_deadline, "seconds the prefill may spend pushing the KV (its deadline_ms)"),
        (
            "--decode-wait",
            _DEFAULTS.decode_wait,
            "seconds the decode waits for the KV before computing it (its wait_ms)",
        ),
        ("--drain-timeout", _DEFAULTS.drain_timeout, "seconds requests in flight have to finish on SIGTERM/SIGINT"),
    )
    for option, default, meaning in seconds:
        parser.add_argument(
            option, type=float, default=default, metavar="SECONDS", help=f"{meaning} (default {default:g})"
        )
    parser.add_argument(
        "--max-body",
        type=int,
        default=_DEFAULTS.max_body,
        help=f"longest request body in bytes (default {_DEFAULTS.max_body})",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def config_from_arguments(args: argparse.Namespace) -> ProxyConfig:
    """:class:`ValueError` for values out of range."""
    return ProxyConfig(
        prefill=_instances(args.prefill),
        decode=_instances([value.split("=", 1)[0] for part in args.decode for value in part.split(",")]),
        receivers=_receivers(args.decode),
        host=args.host,
        port=args.port,
        connect_timeout=args.connect_timeout,
        prefill_timeout=args.prefill_timeout,
        decode_timeout=args.decode_timeout,
        push_deadline=args.push_deadline,
        decode_wait=args.decode_wait,
        max_body=args.max_body,
        drain_timeout=args.drain_timeout,
    )


def _receivers(values: Sequence[str]) -> dict[str, str]:
    """The PD receivers given as ``URL=HOST:PORT``, by the decode instance's base URL."""
    pairs = (entry.split("=", 1) for value in values for entry in value.split(",") if "=" in entry)
    return {base_url(url.strip()): receiver.strip() for url, receiver in pairs}


def _instances(values: Sequence[str]) -> tuple[str, ...]:
    """Instance URLs from options that each hold one or several, comma-separated."""
    return tuple(base_url(url) for value in values for url in value.split(",") if url.strip())


async def serve_until_signalled(config: ProxyConfig) -> None:
    """Run a proxy until SIGTERM or SIGINT, then drain it (a second signal stops it at once)."""
    proxy = Proxy(config)
    async with anyio.create_task_group() as group:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if proxy.stopping:
                        logger.info("lmplug-pd-proxy: %s again, stopping now", name)
                        group.cancel_scope.cancel()
                        return
                    logger.info("lmplug-pd-proxy: %s, stopping (requests in flight may finish)", name)
                    proxy.shutdown()

        async def run(*, task_status: TaskStatus[str]) -> None:
            await proxy.serve(task_status=task_status)
            group.cancel_scope.cancel()

        group.start_soon(watch_signals)
        url = await group.start(run)
        prefill, decode = ", ".join(config.prefill), ", ".join(config.decode)
        print(f"lmplug-pd-proxy ready on {url} (prefill: {prefill}; decode: {decode})", flush=True)


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the proxy the parsed arguments describe; the exit status."""
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)  # under `lmplug pd-proxy`, lmplug's command has configured logging already
    try:
        config = config_from_arguments(args)
    except ValueError as exc:
        print(f"lmplug-pd-proxy: {exc}", file=sys.stderr)
        return 2
    backend = os.environ.get(BACKEND_ENV, "asyncio")
    try:
        anyio.run(serve_until_signalled, config, backend=backend)
    except OSError as exc:
        print(f"lmplug-pd-proxy: cannot serve on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmplug-pd-proxy`` console script."""
    parser = argparse.ArgumentParser(
        prog="lmplug-pd-proxy",
        description="lmplug's PD proxy: each OpenAI request to a prefill instance, then to a decode instance",
    )
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))
