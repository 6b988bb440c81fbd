"""Eval suites checked for contamination against the datasets a version was trained on, through
the admin API: a dataset's n-gram filter (built by registry.ngram_filter from a real JSONL
file) is registered, shown, checked against a suite and deleted; a malformed, mismatched or
oversized filter is refused, and only the admin may send one. `evaluate --report` refuses a
report whose suite the version's training data held (`eval_contaminated`, naming the cases),
records a listed dataset without a filter as unchecked, and with
LORAPLEX_EVALUATE_REQUIRES_NGRAM_FILTERS refuses a card dataset that has no filter."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.body_limit import NGRAM_FILTER_SLACK_BYTES
from gateway.evals.gates import EvalReport
from gateway.evals.runner import run_suite
from gateway.evals.suite import Suite
from registry import service
from registry.ngram_filter import build
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, FILES, build_demo_root

LEAKED = "Summarise the refund policy for order seven in one sentence, as JSON please"
CLEAN = "Describe the shipping options for a parcel sent to another country, as JSON"
SUITE = Suite.model_validate(
    {
        "name": "orders",
        "min_success": 1.0,
        "cases": [
            {"id": "leaked", "prompt": LEAKED, "checks": [{"type": "json"}]},
            {"id": "clean", "prompt": CLEAN, "checks": [{"type": "json"}]},
            {"id": "short", "prompt": "order 7", "checks": [{"type": "json"}]},
        ],
    }
)
ANSWER = ['{"order"', ": 7}"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("contamination"))


def dataset_file(folder: Path, *prompts: str, others: int = 50) -> tuple[str, bytes]:
    """A training set (JSON lines) holding the prompts among others; (sha256, filter file)."""
    rows = [{"prompt": p, "completion": "ok"} for p in prompts]
    rows += [{"prompt": f"unrelated training example number {i} " * 3} for i in range(others)]
    path = folder / f"train-{secrets.token_hex(4)}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    header, ngram_filter = build(path)
    return header.dataset_sha256, ngram_filter.encode(header)


def put_filter(client, digest: str, data: bytes, headers: dict[str, str] = ADMIN):
    return client.put(
        f"/admin/v1/datasets/{digest}/ngram-filter",
        content=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )


def register(client, root: Path, name: str, *digests: str) -> None:
    card = {
        "owner": "ml@example.com",
        "objective": "sft",
        "datasets": [{"name": f"set-{d[:4]}", "sha256": d} for d in digests],
    }
    files = [("files", (f, (root / "v1" / f).read_bytes())) for f in FILES]
    body = {"name": name, "tenant": client.tenant, "card": json.dumps(card)}
    response = client.post("/admin/v1/adapters", data=body, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text


async def _harness(app, key: str, model: str) -> EvalReport:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"Authorization": key}
    ) as http:
        return await run_suite(http, SUITE, model=model, baseline=None, repeat=1, concurrency=2)


def evaluate(client, name: str) -> httpx.Response:
    report = client.portal.call(_harness, client.app, client.headers["Authorization"], f"{name}@1")
    assert report.passed, report.gates
    body: dict[str, Any] = {"report": report.model_dump(mode="json", by_alias=True)}
    return client.post(f"/admin/v1/adapters/{name}/versions/1/evaluate", json=body, headers=ADMIN)


def test_a_filter_is_registered_shown_checked_against_a_suite_and_deleted(demo_root, tmp_path):
    digest, data = dataset_file(tmp_path, LEAKED)
    suite = SUITE.model_dump(mode="json", by_alias=True)
    with client_for(demo_root, ScriptedEngine(ANSWER)) as client:
        url = f"/admin/v1/datasets/{digest}"
        assert client.get(f"{url}/ngram-filter", headers=ADMIN).status_code == 404
        missing = client.post(f"{url}/contamination", json=suite, headers=ADMIN)
        assert missing.status_code == 404, missing.text
        registered = put_filter(client, digest, data)
        assert registered.status_code == 200, registered.text
        shown = client.get(f"{url}/ngram-filter", headers=ADMIN).json()
        assert shown == registered.json()
        assert shown["dataset_sha256"] == digest and shown["registered_by"] == "admin"
        assert shown["ngram_words"] == 8 and shown["lines"] == 51
        assert 0 < shown["false_positive_rate"] < 0.002

        checked = client.post(f"{url}/contamination", json=suite, headers=ADMIN)
        assert checked.status_code == 200, checked.text
        result = checked.json()
        assert result["contaminated"] == ["leaked"] and result["unjudged"] == ["short"]
        assert result["cases"] == 3 and result["suite"] == "orders"
        leaked = [f for f in result["found"] if f["item"] == "leaked:prompt"]
        assert leaked == [{"item": "leaked:prompt", "ngrams": 6, "held": 6, "contaminated": True}]

        deleted = client.delete(f"{url}/ngram-filter", headers=ADMIN)
        assert deleted.status_code == 200 and deleted.json() == shown
        assert client.get(f"{url}/ngram-filter", headers=ADMIN).status_code == 404
        assert client.delete(f"{url}/ngram-filter", headers=ADMIN).status_code == 404


def test_a_broken_mismatched_oversized_or_anonymous_filter_is_refused(demo_root, tmp_path):
    digest, data = dataset_file(tmp_path, LEAKED)
    other = secrets.token_hex(32)
    with client_for(demo_root, ScriptedEngine(ANSWER)) as client:
        anonymous = put_filter(client, digest, data, headers={})
        assert anonymous.status_code == 401, anonymous.text
        # Over the JSON limit but within the filter's: the admin's limit is not anyone's.
        huge = put_filter(
            client, digest, b"x" * (16 * 1024**2 + 1), headers={"Authorization": "Bearer nope"}
        )
        assert huge.status_code == 401, huge.text
        wrong = put_filter(client, other, data)
        assert wrong.status_code == 422, wrong.text
        assert (
            f"built from dataset sha256:{digest}, not {other}" in wrong.json()["error"]["message"]
        )
        broken = put_filter(client, digest, data[:-1])
        assert broken.status_code == 422 and "bits but" in broken.json()["error"]["message"]
        assert put_filter(client, digest, b"").status_code == 422
        bad_digest = put_filter(client, "not-a-digest", data)
        assert bad_digest.status_code == 422, bad_digest.text
        assert (
            client.get(f"/admin/v1/datasets/{digest}/ngram-filter", headers=ADMIN).status_code
            == 404
        )


def test_a_filter_over_the_limit_is_refused_413(demo_root, tmp_path):
    digest, data = dataset_file(tmp_path, LEAKED, others=2000)
    limit = len(data) - NGRAM_FILTER_SLACK_BYTES - 1  # the setting plus room for the header
    assert limit > 0
    with client_for(demo_root, ScriptedEngine(ANSWER), ngram_filter_max_bytes=limit) as client:
        refused = put_filter(client, digest, data)
        assert refused.status_code == 413, refused.text
    with client_for(demo_root, ScriptedEngine(ANSWER), ngram_filter_max_bytes=limit + 1) as client:
        assert put_filter(client, digest, data).status_code == 200


def test_a_report_on_cases_the_training_data_held_is_refused(demo_root, tmp_path):
    leaked_digest, leaked = dataset_file(tmp_path, LEAKED)
    clean_digest, clean = dataset_file(
        tmp_path, "an unrelated prompt with more than eight words in it"
    )
    unfiltered = secrets.token_hex(32)
    name = f"ev-leak-{uuid.uuid4().hex[:6]}"
    with client_for(demo_root, ScriptedEngine(ANSWER)) as client:
        register(client, demo_root, name, clean_digest, leaked_digest, unfiltered)
        for digest, data in ((leaked_digest, leaked), (clean_digest, clean)):
            assert put_filter(client, digest, data).status_code == 200
        refused = evaluate(client, name)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "eval_contaminated"
        assert [p["code"] for p in error["problems"]] == ["eval_contaminated"]
        message = error["problems"][0]["message"]
        assert f"dataset sha256:{leaked_digest} holds 1 of the suite's cases" in message
        assert message.endswith(": leaked")

        # Without the leaked dataset's filter it is recorded as unchecked (none required here).
        url = f"/admin/v1/datasets/{leaked_digest}/ngram-filter"
        assert client.delete(url, headers=ADMIN).status_code == 200
        accepted = evaluate(client, name)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["state"] == "evaluated"

        async def audited():
            async with client.app.state.registry.sessions() as session:
                return await service.list_audit(session, target=f"adapter:{name}")

        entry = next(e for e in client.portal.call(audited) if e.action.endswith("evaluate"))
        datasets = entry.details["evidence"]["datasets"]
        assert list(datasets) == [clean_digest, leaked_digest, unfiltered]
        assert datasets[leaked_digest] is None and datasets[unfiltered] is None
        assert datasets[clean_digest]["contaminated"] == []
        assert datasets[clean_digest]["unjudged"] == 1


def test_with_filters_required_a_listed_dataset_without_one_refuses_the_report(demo_root, tmp_path):
    digest, data = dataset_file(tmp_path, "nothing from the suite is in this training data")
    name = f"ev-req-{uuid.uuid4().hex[:6]}"
    with client_for(
        demo_root, ScriptedEngine(ANSWER), evaluate_requires_ngram_filters=True
    ) as client:
        register(client, demo_root, name, digest)
        unreported = client.post(
            f"/admin/v1/adapters/{name}/versions/1/evaluate", json={"reason": "ok"}, headers=ADMIN
        )
        assert unreported.status_code == 422, unreported.text
        assert unreported.json()["error"]["code"] == "eval_report_required"
        refused = evaluate(client, name)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "eval_dataset_unchecked"
        assert f"dataset sha256:{digest} has no registered n-gram filter" in error["message"]
        assert put_filter(client, digest, data).status_code == 200
        accepted = evaluate(client, name)
        assert accepted.status_code == 200, accepted.text
        # A card that lists no dataset leaves nothing to check the suite against.
        bare = f"ev-bare-{uuid.uuid4().hex[:6]}"
        register(client, demo_root, bare)
        refused = evaluate(client, bare)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "eval_dataset_unchecked"
        assert "lists no training dataset" in refused.json()["error"]["message"]


def test_each_message_is_judged_on_its_own_and_a_shared_system_prompt_is_no_eval_item(
    demo_root, tmp_path
):
    """Training chats share the deployment's system prompt with the suite: that is no leak.
    A user question copied from training is one, behind any system prompt; and a case's
    messages are never run together into sequences no training text held."""
    system = (
        "You are the support assistant of an online shop; answer politely, briefly and only "
        "about orders, refunds, shipping and accounts, never about anything else at all"
    )
    copied = "Can I return a pair of shoes I bought three weeks ago without the original box"
    rows = [
        {
            "messages": [
                {"role": "system", "content": system},
                {
                    "role": "user",
                    "content": f"question {i} about my order number {i} and its delivery date",
                },
            ]
        }
        for i in range(100)
    ]
    rows.append({"messages": [{"role": "user", "content": copied}]})
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    header, ngram_filter = build(path)
    suite = {
        "name": "support",
        "cases": [
            {
                "id": "fresh",
                "messages": [
                    {"role": "system", "content": system},
                    {
                        "role": "user",
                        "content": "Which carriers deliver to Iceland and how long does a "
                        "parcel take",
                    },
                ],
            },
            {
                "id": "copied",
                "messages": [
                    {"role": "system", "content": "Be helpful and concise in every answer."},
                    {"role": "user", "content": copied},
                ],
            },
            {"id": "answer", "prompt": "Tell me", "checks": [{"type": "equals", "text": copied}]},
            {"id": "only-system", "messages": [{"role": "system", "content": system}]},
        ],
    }
    with client_for(demo_root, ScriptedEngine(ANSWER)) as client:
        digest = header.dataset_sha256
        assert put_filter(client, digest, ngram_filter.encode(header)).status_code == 200
        checked = client.post(
            f"/admin/v1/datasets/{digest}/contamination", json=suite, headers=ADMIN
        )
        assert checked.status_code == 200, checked.text
        result = checked.json()
        assert result["contaminated"] == ["copied", "answer"]
        assert result["unjudged"] == ["only-system"]
        found = {f["item"]: f["contaminated"] for f in result["found"]}
        assert found == {"copied:message1": True, "answer:answer0": True}
