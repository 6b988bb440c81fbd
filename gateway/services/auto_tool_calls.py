"""tool_choice "auto": whether and how a request's output is parsed for calls (refused without
a parser), and the output as OpenAI returns it: the calls the deployment's tool-call parser
(gateway.engine.tool_parsing) found in the model's text become `tool_calls`, what is left is
`content`, and finish_reason is "tool_calls" when a call ended the output (as OpenAI's and
vLLM's servers say). Whole bodies and stream chunks; parallel_tool_calls false keeps only the
first call, as vLLM's server does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.client import ChoiceDelta, OutputConstraint
from gateway.engine.tool_parsing import (
    AutoToolPlan,
    ChoiceParser,
    ParsedCall,
    ParsedOutput,
    ToolCallParsing,
    ToolsRefused,
)
from gateway.errors import InvalidRequest
from gateway.schemas.openai import ChatCompletionRequest
from gateway.schemas.structured import MAX_CONSTRAINT_CHARS
from gateway.services.sampling import check_constrainable
from gateway.services.tool_calls import Chunk, new_call_id

logger = logging.getLogger(__name__)

# Once a call has opened, deltas reach the parser at least this many characters at a time.
MIN_BATCH_CHARS = 64


def refuse_auto_without_parser(
    body: ChatCompletionRequest, parsing: ToolCallParsing | None
) -> None:
    if body.wants_auto_calls() and parsing is None:
        raise InvalidRequest(
            "loraplex does not support tool_choice 'auto' (the default with tools) on this "
            "deployment: a call in free text needs the model's tool-call parser, which "
            "its operator sets with LORAPLEX_TOOL_CALL_PARSER. Set tool_choice to "
            "'required', a named function, or 'none'.",
            param="tool_choice",
        )


async def auto_call_plan(
    parsing: ToolCallParsing | None,
    body: ChatCompletionRequest,
    constraint: OutputConstraint | None,
) -> AutoToolPlan | None:
    """How the request's output is generated and parsed when the model may call its tools;
    None when it may not (no tools, or a forced or refused call)."""
    if not body.wants_auto_calls() or parsing is None:
        return None
    try:
        # In a thread: vLLM checks a client's format beside strict tools by compiling it
        # (tens of ms for a large schema), which every stream would otherwise wait for.
        plan = await asyncio.to_thread(
            parsing.plan, body.tools_for_template() or [], body.parallel_tool_calls, constraint
        )
    except ToolsRefused as exc:
        raise InvalidRequest(
            f"The tools cannot be given to the tool-call parser: {exc}", param="tools"
        ) from exc
    tag = plan.constraint
    if tag is not None and tag.kind == "structural_tag":
        # The engine core compiles it on the one thread every tenant's grammars share: the
        # same bound as any constraint (a forced call's schema is refused past it too).
        if len(tag.spec or "") > MAX_CONSTRAINT_CHARS:
            raise InvalidRequest(
                f"The strict tools' call grammar is {len(tag.spec or '')} characters; at "
                f"most {MAX_CONSTRAINT_CHARS} are allowed.",
                param="tools",
            )
        check_constrainable(body)  # the grammar may end the output (one call at most)
    return plan


def parse_whole(plan: AutoToolPlan, text: str, token_ids: list[int]) -> ParsedOutput | None:
    """A whole choice's calls and content; None when the parser failed on it."""
    try:
        return plan.choice_parser().whole(text, token_ids)
    except Exception:  # a parser's bug must not cost the client the answer the model gave
        logger.exception("the tool-call parser %s failed; answering as text", plan.parsing.name)
        return None


def message_and_finish(
    plan: AutoToolPlan, parsed: ParsedOutput | None, text: str, finish_reason: str | None
) -> tuple[dict[str, Any], str | None]:
    """A whole choice's message and finish_reason (`parsed`: parse_whole's)."""
    if parsed is None:
        return {"role": "assistant", "content": text}, finish_reason
    calls = _returned(plan, parsed)
    if not calls:
        return {"role": "assistant", "content": parsed.content}, finish_reason
    content = parsed.content if parsed.content and parsed.content.strip() else None
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call.id or new_call_id(),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls
        ],
    }
    return message, _finish(finish_reason)


def _returned(plan: AutoToolPlan, parsed: ParsedOutput) -> list[ParsedCall]:
    return parsed.calls[:1] if plan.single_call else parsed.calls


def calls_to_judge(
    plan: AutoToolPlan,
    parsed: ParsedOutput | None,
    text: str,
    finish_reason: str | None,
    stop_reason: str | int | None,
    client_stops: Collection[str | int],
) -> tuple[list[tuple[str, str]], bool]:
    """(name, arguments) of each call a choice returned that is the model's to answer for,
    and whether it wrote a call the parser could not read (malformed). An output something
    else ended (max_tokens, the loop guard, the client's stop string or token: `client_stops`)
    may end in half a call: that one, or text that is not a whole call, is not held against
    the model (the model's own end-of-sequence tokens, which vLLM also reports as a
    stop_reason, are its end). The same for whole bodies and streams: a stream is judged on
    its whole text, as a whole body would return it."""
    if parsed is None:
        return [], False
    cut = finish_reason != "stop" or (stop_reason is not None and stop_reason in client_stops)
    calls = [(call.name, call.arguments) for call in _returned(plan, parsed)]
    if cut:
        return calls[:-1], False
    marker = plan.parsing.marker
    return calls, not calls and marker is not None and marker in text


def _finish(finish_reason: str | None) -> str | None:
    # The model ended its output after calling: "tool_calls". Cut by max_tokens, a stop
    # sequence or the loop guard, the reason stays what it was.
    return "tool_calls" if finish_reason == "stop" else finish_reason


@dataclass
class AutoCallStream:
    """Stream deltas of one request's choices, each through its own parser (they keep state:
    a call's markers arrive over several deltas)."""

    plan: AutoToolPlan
    prompt_of: Callable[[int], list[int]]  # a choice's prompt token ids
    # Called with each choice's index, its calls and whether one was malformed (calls_to_judge)
    # once the choice has ended.
    judge: Callable[[int, list[tuple[str, str]], bool], None] | None = None
    client_stops: Collection[str | int] = ()  # the request's stop strings and token ids
    _parsers: dict[int, ChoiceParser] = field(default_factory=dict)
    _called: set[int] = field(default_factory=set)
    _text: dict[int, str] = field(default_factory=dict)  # each choice's output so far
    _sent: dict[int, str] = field(default_factory=dict)  # the content streamed of it
    _pending: dict[int, tuple[str, list[int]]] = field(default_factory=dict)  # not parsed yet
    _failed: set[int] = field(default_factory=set)  # choices whose parser raised
    _token_ids: dict[int, list[int]] = field(default_factory=dict)  # each choice's so far

    def opening(self, index: int) -> dict[str, Any]:
        # As a plain answer opens: whether the model calls a tool is not known yet.
        return {"role": "assistant", "content": ""}

    def deltas(self, index: int, delta: ChoiceDelta) -> list[Chunk]:
        """(delta, logprobs, finish_reason) for each chunk this engine delta makes."""
        finished = delta.finish_reason is not None
        text = self._text[index] = self._text.get(index, "") + delta.text
        if self.judge is not None:
            self._token_ids.setdefault(index, []).extend(delta.token_ids)
        body: dict[str, Any] = {}
        if index not in self._failed:
            try:
                body = self._parsed(index, delta, text, finished)
            except Exception:  # as a whole body does: the rest of the output is text
                logger.exception(
                    "the tool-call parser %s failed mid-stream", self.plan.parsing.name
                )
                self._failed.add(index)
                body = {}
        sent = self._sent[index] = self._sent.get(index, "") + body.get("content", "")
        if (
            (finished or index in self._failed)
            and index not in self._called
            and text.startswith(sent)
            and text != sent
        ):
            # The parser holds back text that may open a call marker ("<tool") and, at the
            # end, forgets it; a failed parser forgets everything: a whole body returns it as
            # content, so the stream does too.
            body["content"] = body.get("content", "") + text[len(sent) :]
            self._sent[index] = text
        out: list[Chunk] = []
        # Held back text (a marker that may be starting) still carries its logprobs.
        if body or delta.logprobs:
            out.append((body, delta.logprobs, None))
        if finished:
            finish = delta.finish_reason
            out.append(({}, None, _finish(finish) if index in self._called else finish))
            if self.judge is not None:
                ids = self._token_ids.pop(index, [])
                parsed = parse_whole(self.plan, text, ids)
                ending = (finish, delta.stop_reason, self.client_stops)
                self.judge(index, *calls_to_judge(self.plan, parsed, text, *ending))
        return out

    def _parsed(self, index: int, delta: ChoiceDelta, text: str, finished: bool) -> dict[str, Any]:
        parser = self._parsers.get(index)
        if parser is None:
            parser = self._parsers[index] = self.plan.choice_parser()
        pending_text, pending_ids = self._pending.pop(index, ("", []))
        pending_text += delta.text
        pending_ids = pending_ids + delta.token_ids
        # Parsers re-read the whole output on every delta once a call has opened (Hermes:
        # 400 short calls over 4000 deltas took 7 s of the event loop every stream shares).
        # There, deltas are handed over in batches that grow with the output, which keeps
        # the work linear; plain text before any call still streams token by token.
        if (
            index in self._called
            and not finished
            and len(pending_text) < max(MIN_BATCH_CHARS, len(text) // 8)
        ):
            self._pending[index] = (pending_text, pending_ids)
            return {}
        parsed = parser.delta(pending_text, pending_ids, self.prompt_of(index), finished)
        body: dict[str, Any] = {}
        if parsed is None:
            return body
        calls = parsed.call_deltas
        if self.plan.single_call:
            calls = [call for call in calls if call.get("index") == 0]
        for call in calls:
            if (call.get("function") or {}).get("name") is not None:
                # A call's opening chunk: clients key the call by its id from here on.
                call["id"] = call.get("id") or new_call_id()
                call["type"] = "function"
        if calls:
            self._called.add(index)
            body["tool_calls"] = calls
        if parsed.content:
            body["content"] = parsed.content
        return body
