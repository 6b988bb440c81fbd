"""Blocking work a caller may give up on (the engine's start): its outcome reaches the loop,
and a caller that stopped waiting is neither blocked nor disturbed by it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.engine.daemon_thread import run_in_daemon_thread


async def test_the_result_and_the_error_reach_the_awaiting_task():
    assert await run_in_daemon_thread(lambda: 42, name="t") == 42

    def broken() -> None:
        raise ValueError("no weights")

    with pytest.raises(ValueError, match="no weights"):
        await run_in_daemon_thread(broken, name="t")


async def test_the_work_runs_in_a_daemon_thread_the_interpreter_does_not_wait_for():
    seen: list[threading.Thread] = []
    await run_in_daemon_thread(lambda: seen.append(threading.current_thread()), name="engine")
    assert seen[0].daemon and seen[0].name == "engine"
    assert seen[0] is not threading.main_thread()


async def test_a_caller_that_gave_up_is_not_disturbed_when_the_work_ends():
    release, finished = threading.Event(), threading.Event()

    def work() -> str:
        release.wait(10)
        finished.set()
        return "late"

    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    try:
        future = run_in_daemon_thread(work, name="t")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(future, timeout=0.05)
        assert future.cancelled()
        release.set()
        await asyncio.to_thread(finished.wait, 10)
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(previous)  # the loop may serve later tests
    assert errors == []  # the late outcome was dropped, not set on the cancelled future
