"""Two gateway replicas, each with its own real engine, on one PostgreSQL registry.

Replica A runs the rollback monitor with automatic promotion on (and fault injection); replica
B is a plain replica. A healthy canary is promoted stage by stage on A's evidence (1 → 10 → 50
→ 100 %) and B follows; then a slow canary (faults on A only) is rolled back by A's monitor, and
B sends the canary's callers back to the stable within 2 s of that decision, measured from the
rollback event's timestamp to the first request B answered from the stable.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import openai
import pytest

from registry.rollout import assign
from tests.conftest import ADMIN_TOKEN, cli, start_gateway, stop_gateway, tenant_with_key

pytestmark = [pytest.mark.engine, pytest.mark.postgres]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WINDOW = 10
CONVERGENCE_S = 2.0
PROMPT = "The gateway serves"


def admin(gateway, method: str, path: str, **kwargs) -> httpx.Response:
    url = f"{gateway.base_url}/admin/v1{path}"
    return httpx.request(method, url, headers=ADMIN, timeout=60, **kwargs)


def users_in_canary(name: str, percent: int, count: int) -> list[str]:
    """`user` values the gateway's sticky key ("user:<user>") puts in the canary at `percent`."""
    found = []
    for i in range(1_000_000):
        if assign(f"user:u{i}", name, percent):
            found.append(f"u{i}")
            if len(found) == count:
                return found
    raise AssertionError("no users found")


def until(predicate, timeout_s: float, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def test_replicas_promote_a_healthy_canary_and_converge_on_a_rollback(
    demo, postgres_database, tmp_path
):
    shared = {
        "LORAPLEX_DATABASE_URL": postgres_database,
        "LORAPLEX_ARTIFACT_DIR": str(tmp_path / "artifacts"),
    }
    with ThreadPoolExecutor(2) as pool:  # both migrate the empty database at once: locked
        starting = [
            pool.submit(
                start_gateway,
                demo,
                tmp_path / "a",
                LORAPLEX_ROLLOUT_AUTO_PROMOTE="1",
                LORAPLEX_ENABLE_FAULTS="1",
                **shared,
            ),
            pool.submit(start_gateway, demo, tmp_path / "b", **shared),
        ]
        errors = [f.exception() for f in starting]
    a, b = (f.result() for f in starting) if not any(errors) else (None, None)
    try:
        assert not any(errors), errors
        run_scenario(a, b, demo)
    finally:
        for f in starting:
            if f.exception() is None:
                stop_gateway(f.result())


def run_scenario(a, b, demo) -> None:
    key = tenant_with_key(a, "replicas")
    name = "replicated"

    def register(files: str, version: int) -> None:
        args = ["adapters", "register", str(demo.adapters[files]), "--name", name]
        registered = cli(a, *args, "--tenant", "replicas")
        assert registered.returncode == 0, registered.stderr + a.log_tail()
        if version > 1:
            assert cli(a, "adapters", "evaluate", f"{name}@{version}").returncode == 0

    register("demo-qkvo-r8", 1)
    register("demo-all-r16", 2)  # `name` stays on v1 (pinned); v2 reaches it by the canary below
    thresholds = {"window": WINDOW, "max_p95_e2e_ms": 1000}
    assert admin(a, "PUT", f"/rollouts/{name}/thresholds", json=thresholds).status_code == 200

    on_a = openai.OpenAI(base_url=a.v1, api_key=key, max_retries=0, timeout=120)
    on_b = openai.OpenAI(base_url=b.v1, api_key=key, max_retries=0, timeout=120)

    def text(client: openai.OpenAI, model: str, user: str = "anyone") -> str:
        response = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, temperature=0, user=user
        )
        return response.choices[0].text

    outputs = {v: text(on_b, f"{name}@{v}") for v in (1, 2)}

    # --- a healthy canary climbs 1 → 10 → 50 → 100 % on A's windows; B follows.
    started = cli(a, "rollout", "start", name, "--version", "2", "--percent", "1")
    assert started.returncode == 0, started.stderr
    early = users_in_canary(name, 1, WINDOW)  # in at 1 % means in at every later stage
    for expected in (10, 50, None):
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda u: text(on_a, name, u), early))
        assert set(answers) == {outputs[2]}

        def promoted(expected=expected):
            status = admin(a, "GET", f"/rollouts/{name}").json()
            return status if status["canary_percent"] == (expected or 0) else None

        status = until(promoted, timeout_s=10)
        assert status, admin(a, "GET", f"/rollouts/{name}").json()
    assert status["stable_version"] == 2 and status["canary_version"] is None
    actors = {e["actor"] for e in status["events"] if e["action"] in ("promote", "complete")}
    assert actors == {"rollout-monitor"}
    outsider = next(f"v{i}" for i in range(10_000) if not assign(f"user:v{i}", name, 50))
    assert until(lambda: text(on_b, name, outsider) == outputs[2], CONVERGENCE_S + 1)

    # --- a slow canary: A's monitor rolls it back; B must honour that within 2 s.
    register("demo-qv-rs32", 3)  # v2 is the pinned stable now: v3 waits for its rollout
    outputs[3] = text(on_b, f"{name}@3")
    assert len(set(outputs.values())) == 3, outputs  # each version's answer is recognisable
    assert text(on_b, name, "anyone") == outputs[2]
    slow = cli(a, "faults", "set", f"{name}@3", "--latency-ms", "1500")
    assert slow.returncode == 0, slow.stderr
    started = cli(a, "rollout", "start", name, "--version", "3", "--percent", "50")
    assert started.returncode == 0, started.stderr
    canary_users = users_in_canary(name, 50, WINDOW)
    watcher = canary_users[0]
    assert until(lambda: text(on_b, name, watcher) == outputs[3], CONVERGENCE_S + 1)

    seen: list[tuple[float, str]] = []  # (wall-clock start of a B request, its answer)
    stop = threading.Event()

    def watch_b() -> None:
        while not stop.is_set():
            began = time.time()
            try:
                seen.append((began, text(on_b, name, watcher)))
            except openai.APIError as exc:  # kept, not raised: the thread must outlive it
                seen.append((began, f"error: {exc}"))

    thread = threading.Thread(target=watch_b, daemon=True)
    thread.start()
    try:
        with ThreadPoolExecutor(WINDOW) as pool:  # one window of slow canary requests on A
            assert set(pool.map(lambda u: text(on_a, name, u), canary_users)) == {outputs[3]}
        status = until(
            lambda: (s := admin(a, "GET", f"/rollouts/{name}").json())["rolled_back_version"] and s,
            timeout_s=10,
        )
        assert status and status["rolled_back_version"] == 3, status
        switched = until(lambda: seen and seen[-1][1] == outputs[2], timeout_s=10)
        assert switched, (status, [answer == outputs[2] for _, answer in seen[-10:]])
        time.sleep(0.5)  # and B stays on the stable
    finally:
        stop.set()
        thread.join(timeout=60)
        cli(a, "faults", "clear")

    event = next(e for e in status["events"] if e["action"] == "rollback")
    assert event["actor"] == "rollout-monitor"
    at = datetime.fromisoformat(event["at"].replace("Z", "+00:00"))
    decided = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()  # stored as UTC
    first_stable = next(
        began
        for i, (began, answer) in enumerate(seen)
        if answer == outputs[2] and all(later == outputs[2] for _, later in seen[i:])
    )
    assert first_stable - decided <= CONVERGENCE_S, (first_stable - decided, seen)
    # no caller of B saw the switch as an error (B's view lags A's decision by up to a poll)
    assert not [answer for _, answer in seen if answer.startswith("error")], seen
    # and before the decision B was still serving the canary to this caller: a real switch
    assert any(answer == outputs[3] for began, answer in seen if began < decided)
