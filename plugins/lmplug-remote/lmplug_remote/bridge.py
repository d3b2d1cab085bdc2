"""Running an asyncio-only client library (redis.asyncio, aiobotocore) from asyncio or trio.

Under asyncio the client simply runs on the caller's loop. Under trio it runs on a private
asyncio loop in a thread the bridge owns (started by :meth:`AsyncioBridge.start`, stopped
and joined by :meth:`AsyncioBridge.aclose`); the awaiting trio task is woken without a
blocking hand-off, and cancelling it cancels the work on the asyncio side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import sniffio

T = TypeVar("T")


class AsyncioBridge:
    """Awaits coroutines of an asyncio-only library from whichever loop the caller runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def threaded(self) -> bool:
        """True when the library runs on the bridge's own loop thread (the caller is not on asyncio)."""
        return self._thread is not None

    async def start(self) -> None:
        """Pick the mode for the current loop; under trio start the private asyncio loop thread."""
        if self._loop is not None:
            return
        if sniffio.current_async_library() == "asyncio":
            self._loop = asyncio.get_running_loop()
            return
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name=f"lmplug-{self.name}-asyncio", daemon=True)
        thread.start()
        await anyio.to_thread.run_sync(started.wait)
        self._loop, self._thread = loop, thread

    async def run(self, function: Callable[..., Coroutine[Any, Any, T]], *args: object) -> T:
        """``await function(*args)`` on the library's loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.name}: bridge used before start()")
        if self._thread is None:
            return await function(*args)

        # The task is created and cancelled on the library's loop, in call order; its done callback
        # wakes this task whether it finished, failed or was cancelled before it started.
        finished = anyio.Event()
        wake = _waker(finished)
        tasks: list[asyncio.Task[T]] = []

        def begin() -> None:
            task = loop.create_task(function(*args))
            task.add_done_callback(lambda _: wake())
            tasks.append(task)

        loop.call_soon_threadsafe(begin)
        try:
            await finished.wait()
        except BaseException:
            # Cancelled: stop the work and wait until it has stopped, so it never writes into
            # buffers its caller has already given back.
            loop.call_soon_threadsafe(lambda: tasks[0].cancel())
            with anyio.CancelScope(shield=True):
                await finished.wait()
            raise
        return tasks[0].result()

    async def aclose(self) -> None:
        """Stop and join the loop thread (if any). Idempotent."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if thread is None or loop is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            await anyio.to_thread.run_sync(asyncio.run_coroutine_threadsafe(cancel_all(), loop).result, 5.0)
        loop.call_soon_threadsafe(loop.stop)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(thread.join)


def _waker(event: anyio.Event) -> Callable[[], None]:
    """A thread-safe, non-blocking way to set ``event`` on the current (trio) loop from another thread."""
    import trio

    token = trio.lowlevel.current_trio_token()

    def wake() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(event.set)

    return wake
