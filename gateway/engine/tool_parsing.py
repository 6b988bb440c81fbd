"""vLLM's tool-call parsers, for tool_choice "auto": the model decides whether to call a tool
and writes the call in its own syntax (Hermes' <tool_call>{...}</tool_call>, Llama's JSON,
Mistral's [TOOL_CALLS], ...), which the parser named by LORAPLEX_TOOL_CALL_PARSER finds in the
output text, whole or as it streams. The same parsers, with the same request adjustments, that
`vllm serve --enable-auto-tool-choice --tool-call-parser NAME` uses (vLLM imported lazily).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.engine.client import OutputConstraint


class ToolParserUnusable(ValueError):
    """The configured parser is not one vLLM has, or the tokenizer lacks its tokens."""


class ToolsRefused(ValueError):
    """vLLM's parser cannot take these tools (or this output format beside them)."""


@dataclass(frozen=True)
class ParsedCall:
    id: str | None  # the parser's own id (some formats carry one); None: the gateway makes one
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: list[ParsedCall]


@dataclass(frozen=True)
class ParsedDelta:
    content: str | None
    # OpenAI's stream shape: {"index", "id"?, "type"?, "function": {"name"?, "arguments"?}}.
    call_deltas: list[dict[str, Any]]


class ToolCallParsing:
    """The deployment's parser: one per gateway, checked against the tokenizer at start."""

    def __init__(
        self, name: str, tokenizer: Any, *, structural_tags: bool, compact_json: bool = False
    ):
        """`structural_tags`: whether the grammar backend compiles xgrammar's structural tags
        (vLLM's xgrammar backend; guidance does not). With them, a call to a tool marked
        `strict` is constrained to its parameters (vLLM's default strict level), an output
        format the client set staying one of the branches the output may take; without, calls
        are parsed, not constrained. `compact_json`: the deployment's
        LORAPLEX_STRUCTURED_OUTPUTS_COMPACT_JSON, which vLLM applies to JSON constraints but
        not to a structural tag's arguments: whitespace runs there are cut to one character
        (xgrammar's least), or a weak model pads the arguments to max_tokens."""
        from vllm.parser.parser_manager import ParserManager

        try:
            # Validates as vLLM's server does at start: a name it has, a tokenizer with the
            # parser's tokens (llama3_json needs <|python_tag|>, mistral [TOOL_CALLS]).
            parser_cls = ParserManager.get_parser(
                tool_parser_name=name, enable_auto_tools=True, tokenizer=tokenizer
            )
        except (TypeError, KeyError, ValueError, ImportError) as exc:
            raise ToolParserUnusable(f"LORAPLEX_TOOL_CALL_PARSER={name!r}: {exc}") from exc
        if parser_cls is None:  # pragma: no cover - get_parser returns None only without a name
            raise ToolParserUnusable(f"LORAPLEX_TOOL_CALL_PARSER={name!r} names no parser")
        self.name = name
        self._structural_tags = structural_tags
        self._compact_json = compact_json
        self._parser_cls = parser_cls
        self._tokenizer = tokenizer
        tool_parser = parser_cls(tokenizer).tool_parser
        # What opens a call in this format (Hermes' <tool_call>, Llama's <|python_tag|>): an
        # output holding it that the parser read no call from wrote a malformed call.
        self.marker: str | None = getattr(tool_parser, "tool_call_start_token", None) or getattr(
            tool_parser, "bot_token", None
        )
        self._try_out()

    def _try_out(self) -> None:
        """Parse one answer, whole and streamed: vLLM registers parsers that fail on every
        output (0.32's "openai" is a stub for its Harmony path), which must stop start-up,
        not every request."""
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        try:
            plan = self.plan([tool], None, None)
            plan.choice_parser().whole("Hello.", [])
            plan.choice_parser().delta("Hello.", [], [0], finished=True)
        except Exception as exc:
            raise ToolParserUnusable(
                f"LORAPLEX_TOOL_CALL_PARSER={self.name!r} fails on a plain answer: {exc!r}"
            ) from exc

    def plan(
        self,
        tools: list[dict[str, Any]],
        parallel_tool_calls: bool | None,
        constraint: OutputConstraint | None,
    ) -> AutoToolPlan:
        """What one "auto" request is generated and parsed with. `tools`: as chat templates
        take them ({"type": "function", "function": {...}}); `constraint`: the client's
        output format, if any."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMClientError

        try:
            return self._plan(ChatCompletionRequest, tools, parallel_tool_calls, constraint)
        except (ValueError, VLLMClientError) as exc:  # vLLM's request model, its tag builder
            raise ToolsRefused(str(exc)) from exc

    def _plan(
        self,
        request_model: Any,
        tools: list[dict[str, Any]],
        parallel_tool_calls: bool | None,
        constraint: OutputConstraint | None,
    ) -> AutoToolPlan:
        from gateway.engine.vllm_convert import structured_outputs

        request: Any = request_model.model_validate(
            {
                "model": "loraplex",  # parsers read only tools, tool_choice, output options
                # Not the conversation: none of the parsers reads it (only Kimi's call ids
                # count earlier calls, and only with a model config the gateway does not pass).
                "messages": [{"role": "user", "content": ""}],
                "tools": tools,
                "tool_choice": "auto",
                "parallel_tool_calls": parallel_tool_calls,
                "structured_outputs": structured_outputs(constraint) if constraint else None,
            }
        )
        parser: Any = self._parser_cls(self._tokenizer, request.tools)
        if self._structural_tags:
            request = parser.adjust_request(request)
        else:  # the parser's own request changes, without the structural tag
            tool_parser = parser.tool_parser
            if tool_parser is not None:
                request = tool_parser.adjust_request(request)
        tag = getattr(request.structured_outputs, "structural_tag", None)
        if tag:
            if self._compact_json:
                tag = json.dumps(_bounded_whitespace(json.loads(tag)))
            constraint = OutputConstraint("structural_tag", tag, "tools")
        return AutoToolPlan(
            self,
            request,
            constraint,
            # Hermes and others: their markers may be special tokens, which detokenizing
            # would drop before the parser sees them.
            skip_special_tokens=request.skip_special_tokens,
            single_call=parallel_tool_calls is False,
        )

    def choice_parser(self, request: Any) -> ChoiceParser:
        return ChoiceParser(self._parser_cls(self._tokenizer, request.tools), request)


@dataclass(frozen=True)
class AutoToolPlan:
    parsing: ToolCallParsing
    request: Any  # vLLM's ChatCompletionRequest, as the parser adjusted it
    constraint: OutputConstraint | None  # what the engine enforces (the client's, or a tag)
    skip_special_tokens: bool
    single_call: bool  # parallel_tool_calls false: only the first call is returned

    def choice_parser(self) -> ChoiceParser:
        """A fresh parser: they hold stream state, so one per choice."""
        return self.parsing.choice_parser(self.request)


class ChoiceParser:
    def __init__(self, parser: Any, request: Any):
        self._parser = parser
        self._request = request

    def whole(self, text: str, token_ids: list[int]) -> ParsedOutput:
        _, content, calls = self._parser.parse(
            text, self._request, enable_auto_tools=True, model_output_token_ids=token_ids
        )
        return ParsedOutput(
            content,
            [ParsedCall(call.id, call.name, call.arguments) for call in calls or ()],
        )

    def delta(
        self, text: str, token_ids: list[int], prompt_token_ids: list[int], finished: bool
    ) -> ParsedDelta | None:
        # The prompt tells the parser whether the output starts in a reasoning section; without
        # it vLLM's parser never leaves that phase and finds no call.
        message = self._parser.parse_delta(
            text, token_ids, self._request, prompt_token_ids, finished=finished
        )
        if message is None:
            return None
        return ParsedDelta(
            message.content,
            [call.model_dump(exclude_none=True) for call in message.tool_calls],
        )


def _bounded_whitespace(node: Any) -> Any:
    """The tag with every JSON content's whitespace runs bounded to one character."""
    if isinstance(node, list):
        return [_bounded_whitespace(item) for item in node]
    if not isinstance(node, dict):
        return node
    bounded = {  # not into the tools' own schemas: they are the client's
        key: value if key == "json_schema" else _bounded_whitespace(value)
        for key, value in node.items()
    }
    if bounded.get("type") == "json_schema" and bounded.get("max_whitespace_cnt") is None:
        bounded["max_whitespace_cnt"] = 1
    return bounded
