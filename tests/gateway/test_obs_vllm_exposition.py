"""/metrics passes the embedded engine's vllm:* families through, except the one whose labels
are comma-joined adapter sets. vLLM's real Prometheus logger, built from the gateway's own
engine arguments (no engine started), records scheduler steps into this process's registry,
as it does inside the gateway."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from tests.deploy.promql import joined_label_values
from tests.gateway.fake_engine import ADMIN_TOKEN, BASE, ScriptedEngine, client_for

LORA_INFO = "vllm:lora_requests_info"


def series(collector) -> list:
    """The samples a collector of one family holds now."""
    return [sample for family in collector.collect() for sample in family.samples]


@pytest.fixture
def vllm_logger(tmp_path) -> Iterator[tuple[object, object]]:
    environ = dict(os.environ)  # importing vLLM and building its config set variables
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics
    from vllm.v1.metrics.stats import SchedulerStats

    from gateway.demo import build_base
    from gateway.engine.vllm_embedded import EmbeddedVLLM
    from gateway.settings import Settings

    build_base(tmp_path / "base")
    settings = Settings(
        base_model=tmp_path / "base",
        served_model_name=BASE,
        adapter_dir=None,
        data_dir=tmp_path / "data",
    )
    config = EmbeddedVLLM(settings, str(tmp_path / "base"), BASE)._engine_args()
    logger = PrometheusStatLogger(config.create_engine_config(), [0])
    try:
        yield logger, SchedulerStats
    finally:
        unregister_vllm_metrics()
        os.environ.clear()
        os.environ.update(environ)


def test_the_comma_joined_lora_info_family_is_left_out(tmp_path, vllm_logger):
    """Every set of running adapters the scheduler ever had became a series of its own,
    never removed: unbounded cardinality on /metrics (review)."""
    logger, scheduler_stats = vllm_logger
    adapters = [f"adapter-{i}" for i in range(1, 9)]

    def steps(running_sets) -> None:
        for running in running_sets:
            stats = scheduler_stats(
                running_lora_adapters=dict.fromkeys(running, 1), waiting_lora_adapters={}
            )
            logger.record(stats, None)  # type: ignore[attr-defined]

    steps(itertools.combinations(adapters, 2))
    held = REGISTRY._names_to_collectors[LORA_INFO]
    assert len(series(held)) == 28  # what vLLM would have exposed

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with client_for(tmp_path, ScriptedEngine(["a"]), admin_token=ADMIN_TOKEN) as client:
        scraped = client.get("/metrics", headers=admin)
        assert scraped.status_code == 200
        assert LORA_INFO not in scraped.text
        assert joined_label_values(scraped.text) == set()  # nothing else joins a list
        # The engine's other families still pass through, and loraplex's own.
        assert "vllm:num_requests_running{" in scraped.text
        assert "loraplex_engine_up " in scraped.text
        # What vLLM keeps in memory is emptied at each scrape: only what came since.
        assert series(held) == []
        steps([adapters[:3]])
        assert LORA_INFO not in client.get("/metrics", headers=admin).text
        assert series(held) == []
