"""A real Prometheus scrapes the real gateway with deploy/'s alert rules loaded: every rule
evaluates without error and every dashboard query runs (vector matching, functions, label
sets are checked only by execution, not by parsing)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import METRICS_TOKEN, bearer, free_port
from tests.deploy.conftest import find_tool
from tests.deploy.promql import ALERTS, dashboard_queries

pytestmark = pytest.mark.engine
SCRAPE_INTERVAL_S = 1
READY_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def prometheus(gateway, tmp_path_factory) -> Iterator[str]:
    binary = find_tool("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus not found on PATH or in the venv: `make setup` unpacks it with "
            "promtool from Debian's `prometheus` package"
        )
    # Traffic first, so per-tenant and per-adapter series exist when the first scrape comes.
    for model in ("demo-qkvo-r8", "loraplex-demo-base"):
        reply = httpx.post(
            f"{gateway.v1}/chat/completions",
            headers=bearer(gateway.api_key),
            json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
    refused = httpx.post(
        f"{gateway.v1}/chat/completions",
        headers=bearer("not-a-key"),
        json={"model": "demo-qkvo-r8", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert refused.status_code == 401  # an auth failure for the tenancy panel

    workdir: Path = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval=f"{SCRAPE_INTERVAL_S}s", evaluation_interval=f"{SCRAPE_INTERVAL_S}s"
    )
    config["rule_files"] = [str(ALERTS)]
    gateway_job = next(j for j in config["scrape_configs"] if j["job_name"] == "loraplex-gateway")
    gateway_job["static_configs"] = [{"targets": [gateway.base_url.removeprefix("http://")]}]
    (workdir / "metrics-token").write_text(METRICS_TOKEN)  # the test gateway's, not compose's
    gateway_job["authorization"]["credentials_file"] = str(workdir / "metrics-token")
    config["scrape_configs"] = [gateway_job]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    address = f"127.0.0.1:{free_port()}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{address}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()
            # Enough scrapes for rate() over the shortest window the queries use.
            if instant(url, "count_over_time(up[1m])", check=False) >= 4:
                break
            time.sleep(0.5)
        else:
            pytest.fail(
                f"no scrapes in {READY_TIMEOUT_S}s:\n{(workdir / 'prometheus.log').read_text()}"
            )
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(url: str, promql: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    # While starting, Prometheus answers 503 in plain text ("Service Unavailable").
    assert response.status_code == 200, f"{promql}: {response.status_code} {response.text}"
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    assert not body.get("warnings"), f"{promql}: {body['warnings']}"
    return body["data"]["result"]


def instant(url: str, promql: str, check: bool = True) -> float:
    try:
        result = query(url, promql)
    except (httpx.HTTPError, AssertionError):
        if check:
            raise
        return 0.0
    return float(result[0]["value"][1]) if result else 0.0


def test_gateway_is_scraped_and_up(prometheus):
    assert instant(prometheus, 'up{job="loraplex-gateway"}') == 1
    assert instant(prometheus, "loraplex_engine_up") == 1


def test_every_alert_rule_evaluates_cleanly(prometheus):
    time.sleep(2 * SCRAPE_INTERVAL_S)  # at least one evaluation after the data arrived
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {
        r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    }
    assert loaded.keys() == expected
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # A healthy gateway: nothing about it is pending or firing. It has no shared limits store:
    # no store series either, so no alert says it is down.
    for name in (
        "LoraplexGatewayDown",
        "LoraplexEngineDown",
        "LoraplexAdapterErrorRate",
        "LoraplexLimitStoreDown",
    ):
        assert loaded[name]["state"] == "inactive", name
    assert query(prometheus, "loraplex_limit_store_up") == []


def test_every_dashboard_query_runs(prometheus):
    queries = dashboard_queries()
    with_data = [q.where for q in queries if query(prometheus, q.promql)]
    # The traffic above fills the overview, tenant, adapter, residency and engine panels;
    # rollouts, rollbacks, evictions and rate limits have had no event yet.
    for panel in (
        "'Requests/s by status'",
        "'Time to first token'",
        "'Requests/s by tenant'",
        "'p95 time to first token by adapter version'",
        "'Adapters resident by tier'",
        "'Engine up'",
        "'KV cache usage'",
        "'Auth failures/s by reason'",
        "variable $tenant",
        "variable $adapter",
    ):
        assert any(panel in where for where in with_data), f"{panel} shows no data"
