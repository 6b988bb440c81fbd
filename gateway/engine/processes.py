"""The processes an abandoned engine start leaves behind."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection

import psutil

logger = logging.getLogger(__name__)


def descendants() -> set[int]:
    """The pids of every process this one started, and theirs."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def stop_descendants(timeout_s: float = 5.0, *, spare: Collection[int] = ()) -> int:
    """SIGTERM every process this one started (and theirs) but those in `spare` (what ran
    before the engine's start), SIGKILL what is left after `timeout_s`; returns how many there
    were. For a gateway that gave up on its engine's start
    (a signal, the start-up timeout) and is about to exit: vLLM's engine core may still be
    importing, before loraplex's plugin makes it follow its parent, or wait forever on a
    handshake with the process that is going away, holding its memory (device memory too)."""
    children = [c for c in psutil.Process().children(recursive=True) if c.pid not in spare]
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if children:
        logger.warning("stopped %d engine process(es) left by the abandoned start", len(children))
    return len(children)
