"""Blocking work whose caller may stop waiting and exit before it ends."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_daemon_thread(work: Callable[[], T], *, name: str) -> asyncio.Future[T]:
    """`work()` in a daemon thread, its outcome as a future of the running loop.

    Unlike `loop.run_in_executor`, whose worker threads the interpreter joins at exit, a process
    that gave up on the work (a timeout, a signal) can exit while it still runs. The work must
    clean up after itself if nobody takes its result (cancelling the future stops nothing)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled by a caller who gave up
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task as it is
            error = exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
