"""Answer receipts on request (header `X-Loraplex-Answer-Receipt`): a non-streamed answer's text
bound to the exact request bytes it answered and to its response id (gateway/feedback_ids.py).
`loraplex eval run` asks for them so that an eval report handed in as evidence carries the
gateway's own word for every answer; nobody else pays for them (one sha256 of the body and of
the text, only when asked)."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from gateway.feedback_ids import ANSWER_RECEIPT_HEADER, ResponseIds


async def attach_answer_receipt(request: Request, response: Response, body: dict[str, Any]) -> None:
    """Set the receipt header on a one-choice answer whose client asked for it."""
    if ANSWER_RECEIPT_HEADER not in request.headers or len(body.get("choices", ())) != 1:
        return
    ids: ResponseIds | None = getattr(request.app.state, "response_ids", None)
    if ids is None:
        return
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    # FastAPI read the body to parse it: this is the same request's cached bytes.
    raw = await request.body()
    response.headers[ANSWER_RECEIPT_HEADER] = ids.answer_receipt(body["id"], raw, text or "")
