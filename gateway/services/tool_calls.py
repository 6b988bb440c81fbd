"""A forced tool call's output as OpenAI returns it: `tool_calls` on the assistant message
(content null), in whole bodies and in stream chunks.

The engine generated the text under the tools' schema (gateway.schemas.tools): for a named
function the text is its arguments; for "required" it is a JSON array of {"name",
"parameters"} calls. A text cut by max_tokens is not whole JSON: "required" then returns it as
content with finish_reason "length" (nothing to call), a named call its partial arguments, as
OpenAI does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.client import ChoiceDelta, TokenLogprob
from gateway.schemas.openai import ChatCompletionRequest
from gateway.schemas.tools import NamedToolChoice


@dataclass(frozen=True)
class ForcedCall:
    function: str | None  # the named function; None: any of the tools ("required")


def forced_call_of(body: ChatCompletionRequest) -> ForcedCall | None:
    """The call a chat request forces, if any (tool_choice "required" or a named function)."""
    forced = body.forced_call()
    if forced is None:
        return None
    return ForcedCall(forced.function.name if isinstance(forced, NamedToolChoice) else None)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(index: int, name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id or new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_required(text: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in a "required" output; None when it is not whole
    (cut by max_tokens or a stop sequence)."""
    try:
        calls = json.loads(text)
    except (ValueError, RecursionError):  # cut short; nested or a number past the decoder
        return None
    if not isinstance(calls, list) or not calls:
        return None
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = json.dumps(call.get("parameters", {}), ensure_ascii=False)
        parsed.append((call["name"], arguments))
    return parsed


def message_and_finish(
    forced: ForcedCall, text: str, finish_reason: str | None
) -> tuple[dict[str, Any], str | None]:
    """A whole choice's message and finish_reason."""
    if forced.function is not None:
        call = _call(0, forced.function, text)
        del call["index"]  # messages' calls carry no index; stream chunks' do
        return {"role": "assistant", "content": None, "tool_calls": [call]}, finish_reason
    calls = parse_required(text)
    if calls is None:
        return {"role": "assistant", "content": text}, finish_reason
    made = [_call(0, name, arguments) for name, arguments in calls]
    for call in made:
        del call["index"]
    # OpenAI's and vLLM's finish_reason for a call the model chose to make: "tool_calls".
    return {"role": "assistant", "content": None, "tool_calls": made}, (
        "tool_calls" if finish_reason == "stop" else finish_reason
    )


# One stream chunk's choice: its delta, its logprobs and its finish_reason.
Chunk = tuple[dict[str, Any], list[TokenLogprob] | None, str | None]


@dataclass
class ToolCallStream:
    """Stream deltas of forced calls, per choice. A named call streams its arguments as they
    come (its id and name in the opening chunk); "required" is held until the choice ends,
    since which functions it calls is known only from the whole array."""

    forced: ForcedCall
    # A reasoning model's call opens after its reasoning (as vLLM's server streams it): with
    # the first delta of the answer, not in the opening chunk.
    opens_late: bool = False
    _held: dict[int, str] = field(default_factory=dict)
    _held_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    _opened: set[int] = field(default_factory=set)

    def opening(self, index: int) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": None}
        if self.forced.function is not None and not self.opens_late:
            delta["tool_calls"] = [_call(0, self.forced.function, "")]
            self._opened.add(index)
        return delta

    def deltas(self, index: int, delta: ChoiceDelta) -> list[Chunk]:
        """(delta, logprobs, finish_reason) for each chunk this engine delta makes."""
        if self.forced.function is not None:
            out: list[Chunk] = []
            if delta.text or delta.logprobs:
                arguments: dict[str, Any] = {"index": 0, "function": {"arguments": delta.text}}
                if index not in self._opened:
                    self._opened.add(index)
                    arguments = _call(0, self.forced.function, delta.text)
                out.append(({"tool_calls": [arguments]}, delta.logprobs, None))
            if delta.finish_reason:
                out.append(({}, None, delta.finish_reason))
            return out
        self._held[index] = self._held.get(index, "") + delta.text
        if delta.logprobs:
            self._held_logprobs.setdefault(index, []).extend(delta.logprobs)
        if not delta.finish_reason:
            return []
        text = self._held.pop(index)
        logprobs = self._held_logprobs.pop(index, None)
        message, finish = message_and_finish(self.forced, text, delta.finish_reason)
        if message.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            body: dict[str, Any] = {"tool_calls": calls}
        else:
            body = {"content": text}
        return [(body, logprobs, None), ({}, None, finish)]
