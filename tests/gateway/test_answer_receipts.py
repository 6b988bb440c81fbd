"""Answer receipts: given only when asked, for one-choice non-streamed answers, binding the text
to the exact request bytes and the response id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.feedback_ids import ANSWER_RECEIPT_HEADER
from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("receipts"))


def post(client, path: str, body: dict, ask: bool = True):
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if ask:
        headers[ANSWER_RECEIPT_HEADER] = "1"
    return raw, client.post(path, content=raw, headers=headers)


def test_a_receipt_binds_the_answer_to_the_request_bytes_and_is_given_only_when_asked(demo_root):
    with client_for(demo_root, ScriptedEngine(["Hello", " there"])) as client:
        ids = client.app.state.response_ids
        chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path, body, text_of in (
            ("/v1/chat/completions", chat, lambda c: c["message"]["content"]),
            (
                "/v1/completions",
                {"model": BASE, "prompt": "hi", "max_tokens": 2},
                lambda c: c["text"],
            ),
        ):
            raw, answered = post(client, path, body)
            assert answered.status_code == 200, answered.text
            data = answered.json()
            text = text_of(data["choices"][0])
            assert text == "Hello there"
            receipt = answered.headers[ANSWER_RECEIPT_HEADER]
            assert ids.answer_matches(receipt, data["id"], raw, text)
            assert not ids.answer_matches(receipt, data["id"], raw, text + "!")
            assert not ids.answer_matches(receipt, data["id"], raw + b" ", text)
            _, unasked = post(client, path, body, ask=False)
            assert ANSWER_RECEIPT_HEADER not in unasked.headers
            _, two = post(client, path, {**body, "n": 2})
            assert two.status_code == 200 and ANSWER_RECEIPT_HEADER not in two.headers
            _, streamed = post(client, path, {**body, "stream": True})
            assert streamed.status_code == 200 and ANSWER_RECEIPT_HEADER not in streamed.headers
