"""An abandoned engine start stops the processes it began (vLLM's engine core may never learn
that the gateway is gone). Run in a process of its own: stop_descendants stops every process
its caller started, and the test session's own (a running gateway) must live on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, time
    import psutil
    from gateway.engine.processes import descendants, stop_descendants

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    present = descendants()  # running before the engine's start: spared
    children = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
        subprocess.Popen([sys.executable, "-c", stubborn]),
    ]
    time.sleep(1.0)  # the second ignores SIGTERM by now
    stopped = stop_descendants(timeout_s=1.0, spare=present)
    ended = all(child.wait(timeout=5) is not None for child in children)
    print(stopped, ended, bystander.poll() is None, len(psutil.Process().children()))
    bystander.kill()
    """
)


def test_every_new_descendant_is_stopped_even_one_that_ignores_sigterm():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["2", "True", "True", "1"], done.stdout + done.stderr
