"""Several worker processes: with PROMETHEUS_MULTIPROC_DIR set, /metrics aggregates every
process's values (counters summed, live gauges summed over live processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    """
    from gateway.metrics import REQUESTS, REQUESTS_IN_FLIGHT
    REQUESTS.labels("acme", "bot", "1", "chat", "200").inc(3)
    REQUESTS_IN_FLIGHT.labels("acme", "bot").inc()
    import os
    print(os.getpid())
    """
)
SCRAPER = textwrap.dedent(
    """
    import sys
    from prometheus_client import generate_latest, multiprocess
    for pid in sys.argv[1:]:  # what a process manager's child-exit hook does
        multiprocess.mark_process_dead(int(pid))
    from gateway.routes.metrics import _registry
    print(generate_latest(_registry()).decode())
    """
)


def run(code: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def sample(text: str, name: str) -> float:
    line = next(
        line for line in text.splitlines() if line.startswith(f"{name}{{") and "acme" in line
    )
    return float(line.rsplit(" ", 1)[1])


def test_two_workers_are_aggregated(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = run(WORKER, env).strip()
    run(WORKER, env)
    both = run(SCRAPER, env)
    assert sample(both, "loraplex_requests_total") == 6.0  # counters summed
    assert sample(both, "loraplex_requests_in_flight") == 2.0  # live gauges summed
    one_gone = run(SCRAPER, env, first)
    assert sample(one_gone, "loraplex_requests_in_flight") == 1.0  # a dead worker's drops out
    assert sample(one_gone, "loraplex_requests_total") == 6.0  # its requests still count
