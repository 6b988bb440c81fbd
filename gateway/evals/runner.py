"""Sending an eval suite through the gateway, as a tenant's client does.

Each case is sent `repeat` times to the model under test (and to a baseline, case by case in
the same order, so both see the same engine load), on the OpenAI routes with the tenant's key.
A 429 or 503 is retried after its Retry-After (a rate limit or a starting engine is not the
adapter's failure); any other refusal is the answer's error. The response id is kept: it is the
gateway's receipt of which version answered (gateway/feedback_ids.py), checked when the report
is handed in as evidence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import ValidationError

from gateway.evals.gates import EvalReport, Generation, Run, judge, verdict
from gateway.evals.suite import Case, Suite
from gateway.feedback_ids import ANSWER_RECEIPT_HEADER

RETRIED_STATUSES = (429, 503)
MAX_ATTEMPTS = 6
MAX_RETRY_WAIT_S = 30.0


async def run_suite(
    client: httpx.AsyncClient,
    suite: Suite,
    *,
    model: str,
    baseline: str | None,
    repeat: int,
    concurrency: int,
    tenant: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Every case, `repeat` times, against `model` (and `baseline`), at most `concurrency` requests
    in flight; the report with its gates judged."""
    started = datetime.now(UTC)
    run_id = secrets.token_hex(16)
    limit = asyncio.Semaphore(concurrency)
    models = [model] if baseline is None else [model, baseline]
    jobs = [(m, case, i) for case in suite.cases for i in range(repeat) for m in models]

    async def one(target: str, case: Case, index: int) -> Generation:
        async with limit:
            generation = await _ask(client, target, case, run_seed(run_id, case.id, index))
        if progress is not None:
            progress(1)
        return generation

    answers = await asyncio.gather(*(one(*job) for job in jobs))
    runs = {
        target: Run(
            model=target,
            generations=[a for (m, _, _), a in zip(jobs, answers, strict=True) if m == target],
        )
        for target in models
    }
    candidate = runs[model]
    against = runs[baseline] if baseline is not None else None
    gates = judge(suite, candidate, against)
    return EvalReport(
        suite=suite,
        run_id=run_id,
        tenant=tenant,
        repeat=repeat,
        candidate=candidate,
        baseline=against,
        started_at=started,
        finished_at=datetime.now(UTC),
        gates=gates,
        passed=verdict(gates),
    )


def run_seed(run_id: str, case_id: str, index: int) -> int:
    """The sampling seed of a case's `index`-th answer in a run (the baseline's too, so both
    draw alike). Fixed by the run, so the request for each answer is fixed: asking again gets
    the same answer, and a lucky answer cannot be picked from many (only a whole run)."""
    digest = hashlib.sha256(f"{run_id}\x00{case_id}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def request_body(model: str, case: Case, seed: int) -> dict[str, Any]:
    """The body the harness sends for one answer; the gateway rebuilds it from the report to
    check each answer's receipt, so an answer to any other request (a friendlier prompt, a
    constraint, another seed) is no evidence."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": case.max_tokens,
        "temperature": case.temperature,
        "seed": seed,
    }
    if case.messages is not None:
        body["messages"] = [message.model_dump() for message in case.messages]
    else:
        body["prompt"] = case.prompt
    return body


def encode_request(body: dict[str, Any]) -> bytes:
    """The one spelling of a body (ASCII, compact) that is sent, and that receipts bind."""
    return json.dumps(body, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


async def _ask(client: httpx.AsyncClient, model: str, case: Case, seed: int) -> Generation:
    path = "/v1/chat/completions" if case.messages is not None else "/v1/completions"
    content = encode_request(request_body(model, case, seed))
    headers = {"content-type": "application/json", ANSWER_RECEIPT_HEADER: "1"}
    for attempt in range(MAX_ATTEMPTS):
        try:
            response = await client.post(path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return Generation(case=case.id, error=f"{type(exc).__name__}: {exc}"[:2000])
        if response.status_code in RETRIED_STATUSES and attempt < MAX_ATTEMPTS - 1:
            await asyncio.sleep(retry_after(response, attempt))
            continue
        return _generation(case, response)
    raise AssertionError("unreachable: the last attempt returns")


def retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        wait = float(response.headers.get("retry-after", ""))
    except ValueError:
        wait = 2.0**attempt
    return min(max(wait, 0.1), MAX_RETRY_WAIT_S)


def _generation(case: Case, response: httpx.Response) -> Generation:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not response.is_success or not isinstance(data, dict):
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:500]
        code = error.get("code") if isinstance(error, dict) else None
        return Generation(
            case=case.id, error=f"{response.status_code} {code or ''}: {message}"[:2000]
        )
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if case.messages is not None else choice["text"]
        return Generation(
            case=case.id,
            text=text or "",
            finish_reason=choice.get("finish_reason"),
            response_id=data.get("id"),
            receipt=response.headers.get(ANSWER_RECEIPT_HEADER),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValidationError) as exc:
        return Generation(case=case.id, error=f"unexpected answer shape: {exc!r}"[:2000])


def pin_sentinels(suite: Suite, run: Run) -> tuple[Suite, list[str]]:
    """The suite with each unpinned sentinel pinned to the answer `run` gave it; the ids of the
    sentinels left unpinned because their answers differed between repeats or failed."""
    answers: dict[str, set[str | None]] = {}
    for generation in run.generations:
        text = None if generation.error is not None else generation.text
        answers.setdefault(generation.case, set()).add(text)
    cases, unsteady = [], []
    for case in suite.cases:
        seen = answers.get(case.id, set())
        if not case.sentinel or case.pinned is not None:
            cases.append(case)
        elif len(seen) == 1 and None not in seen:
            (text,) = seen
            pin = {"type": "equals", "text": (text or "").strip()}
            data = case.model_dump(by_alias=True)
            cases.append(Case.model_validate({**data, "checks": [*data["checks"], pin]}))
        else:
            unsteady.append(case.id)
            cases.append(case)
    return suite.model_copy(update={"cases": cases}), unsteady
