"""What loraplex adds to each process vLLM starts (engine core, workers), besides the ops.

- `plugin_status`: a worker RPC (`collective_rpc("loraplex_plugin_status")`) by which the
  gateway checks, after start-up, that the plugin ran in every worker and its tenant-safe CPU
  ops are the ones bound. The plugin arrives through vLLM's entry points, which vLLM skips
  silently under a `VLLM_PLUGINS` that does not name it and only logs when loading fails: on
  CPU, base-model rows of a full-slot batch would then get the last slot's adapter again.
- `exit_with_parent`: vLLM's engine processes outlive a gateway that is killed (SIGKILL, the
  OOM killer, a grace period run out) and keep their memory, device memory too, while the next
  gateway starts beside them. Each child watches its parent and exits when it is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)
PARENT_POLL_S = 1.0


def plugin_status(worker: Any = None) -> dict[str, Any]:
    """What the plugin installed in this process (a worker method: `worker` is vLLM's)."""
    import vllm

    from kernels import cpu_lora_ops

    return {"vllm": vllm.__version__, "cpu_ops_masked": cpu_lora_ops.installed()}


def exit_with_parent(poll_s: float = PARENT_POLL_S) -> bool:
    """In a multiprocessing child, start a daemon thread that sends this process SIGTERM once
    the process that started it is gone: it is re-parented (getppid changes), or its parent's
    multiprocessing sentinel says it ended. The sentinel also catches a parent gone before
    this ran (a gateway stopped during the engine's start) and a forkserver child, whose
    getppid is the fork server, not the gateway. False in a process that was not started by
    multiprocessing (the gateway itself must keep its own lifetime)."""
    started_by = multiprocessing.parent_process()
    if started_by is None:
        return False
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and started_by.is_alive():
            time.sleep(poll_s)
        logger.warning(
            "loraplex: the process that started this one (%s) is gone: exiting", started_by.pid
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="loraplex-exit-with-parent", daemon=True).start()
    return True
