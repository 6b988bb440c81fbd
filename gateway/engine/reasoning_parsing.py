"""vLLM's reasoning parsers: a reasoning model (DeepSeek R1, Qwen3, ...) thinks in its own
markup before it answers (<think>...</think>), and the parser named by LORAPLEX_REASONING_PARSER
(vLLM's --reasoning-parser names) splits each chat output into `reasoning` and `content`, whole
or as it streams. Only the content goes on to the rest of the gateway (tool calls, forced
calls, the tool-call judge), as in vLLM's server, where the tool parser reads what follows the
reasoning. The engine is told the same parser, so a structured output's grammar starts where
the reasoning ends (vLLM imported lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.engine.client import ChoiceDelta, TokenLogprob

# An output token and its logprob (None when the client asked for none).
Token = tuple[int, TokenLogprob | None]


class ReasoningParserUnusable(ValueError):
    """The configured parser is not one vLLM has, or cannot serve this tokenizer."""


@dataclass(frozen=True)
class ReasoningSplit:
    """A whole choice's output, split."""

    reasoning: str
    content: str
    content_token_ids: list[int]  # the output's tokens after the reasoning ended
    reasoning_tokens: int  # the output's tokens before it (markers included)
    reasoning_logprobs: list[TokenLogprob] | None  # each side's tokens' (with logprobs asked)
    content_logprobs: list[TokenLogprob] | None


def _marker_tokens(reasoning_parser: Any, tokenizer: Any) -> dict[int, str]:
    """The parser's reasoning markers that are one token each: id → text."""
    markers = {}
    for text in (
        getattr(reasoning_parser, "reasoning_start_str", None),
        getattr(reasoning_parser, "reasoning_end_str", None),
    ):
        if not text:
            continue
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and tokenizer.decode([token]) == text:
            markers[token] = text
    return markers


def _reads_only_marker_ids(reasoning_parser: Any, markers: dict[int, str]) -> bool:
    """Whether the parser's streaming reads of its history only which marker tokens came:
    vLLM's <think>-token parsers (DeepSeek R1's and the base they share)."""
    from vllm.reasoning.basic_parsers import BaseThinkingReasoningParser
    from vllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser

    known = {
        BaseThinkingReasoningParser.extract_reasoning_streaming,
        DeepSeekR1ReasoningParser.extract_reasoning_streaming,
    }
    kind = type(reasoning_parser)
    return (
        isinstance(reasoning_parser, BaseThinkingReasoningParser)
        and kind.extract_reasoning_streaming in known
        and kind.is_reasoning_end_streaming
        is BaseThinkingReasoningParser.is_reasoning_end_streaming
        and {reasoning_parser.start_token_id, reasoning_parser.end_token_id} <= set(markers)
    )


class ReasoningParsing:
    """The deployment's reasoning parser: one per gateway, checked against the tokenizer at
    start (and against the tool-call parser it runs before, if any)."""

    def __init__(self, name: str, tokenizer: Any, *, tool_call_parser: str | None = None):
        from vllm.parser.abstract_parser import DelegatingParser
        from vllm.parser.parser_manager import ParserManager

        try:
            # As vLLM's server validates at start: a name it has, a tokenizer with its markers
            # (deepseek_r1 and qwen3 need <think> and </think> in the vocabulary).
            parser_cls = ParserManager.get_parser(reasoning_parser_name=name, tokenizer=tokenizer)
            if tool_call_parser:
                together = ParserManager.get_parser(
                    tool_parser_name=tool_call_parser,
                    reasoning_parser_name=name,
                    enable_auto_tools=True,
                )
            else:
                together = None
        except (TypeError, KeyError, ValueError, RuntimeError, ImportError) as exc:
            raise ReasoningParserUnusable(f"LORAPLEX_REASONING_PARSER={name!r}: {exc}") from exc
        if parser_cls is None:  # pragma: no cover - get_parser returns None only without a name
            raise ReasoningParserUnusable(f"LORAPLEX_REASONING_PARSER={name!r} names no parser")
        if together is not None and together.__bases__ != (DelegatingParser,):
            # vLLM composes these pairs into one parser of their own (Kimi K3, Cohere, ...):
            # their calls may sit inside the reasoning markup, which a reasoning stage ahead of
            # the tool parser would hide from it.
            raise ReasoningParserUnusable(
                f"LORAPLEX_REASONING_PARSER={name!r} with LORAPLEX_TOOL_CALL_PARSER="
                f"{tool_call_parser!r}: vLLM parses this pair as one format, which loraplex "
                "does not support; unset one of them"
            )
        self.name = name
        self._parser_cls = parser_cls
        self._tokenizer = tokenizer
        self._request = self._adjusted_request(parser_cls)
        reasoning_parser = parser_cls(tokenizer).reasoning_parser
        self._markers = _marker_tokens(reasoning_parser, tokenizer)
        self._history_free = _reads_only_marker_ids(reasoning_parser, self._markers)
        # Models whose markers are special tokens: detokenizing would drop them.
        self.skip_special_tokens: bool = self._request.skip_special_tokens
        self._try_out()

    def _adjusted_request(self, parser_cls: Any) -> Any:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate(
            {"model": "loraplex", "messages": [{"role": "user", "content": ""}]}
        )
        request = parser_cls(self._tokenizer).adjust_request(request)
        if request.structured_outputs is not None or request._grammar_from_parser:
            # Mistral's reasoning parser constrains every output with a grammar of its own.
            raise ReasoningParserUnusable(
                f"LORAPLEX_REASONING_PARSER={self.name!r} constrains outputs with a grammar of "
                "its own, which loraplex does not apply"
            )
        return request

    def _try_out(self) -> None:
        """Split one answer, whole and streamed: a parser that fails on every output must stop
        start-up, not every request."""
        try:
            self.whole("Hello.", [], [])
            self.stream([]).split(ChoiceDelta(0, "Hello.", [], finish_reason="stop"))
        except Exception as exc:
            raise ReasoningParserUnusable(
                f"LORAPLEX_REASONING_PARSER={self.name!r} fails on a plain answer: {exc!r}"
            ) from exc

    def _parser(self, switches: dict[str, Any] | None) -> Any:
        # Some parsers read the template's switches (DeepSeek V3.1's `thinking`, Kimi's
        # effort) to know whether the output starts in reasoning, as vLLM's server gives them.
        return self._parser_cls(self._tokenizer, chat_template_kwargs=switches or {})

    def ended_in(self, prompt_token_ids: list[int], switches: dict[str, Any] | None) -> bool:
        """Whether the prompt already closed the reasoning section (Qwen3's template with
        enable_thinking false writes an empty one): the whole output is then content."""
        return bool(self._parser(switches).is_reasoning_end(prompt_token_ids))

    def whole(
        self,
        text: str,
        token_ids: list[int],
        prompt_token_ids: list[int],
        switches: dict[str, Any] | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> ReasoningSplit:
        """Split as a stream delta is (ReasoningStream): vLLM's whole-output parse differs
        from its streaming (Qwen3's left a `</think>` the model wrote first in the content,
        where a stream drops it), and a client must get the same answer either way."""
        stream = self.stream(prompt_token_ids, switches)
        reasoning, reasoning_logprobs, content = stream.split(
            ChoiceDelta(0, text, list(token_ids), logprobs, finish_reason="stop")
        )
        return ReasoningSplit(
            reasoning,
            content.text,
            content.token_ids,
            stream.reasoning_tokens,
            reasoning_logprobs,
            content.logprobs,
        )

    def stream(
        self, prompt_token_ids: list[int], switches: dict[str, Any] | None = None
    ) -> ReasoningStream:
        """A fresh splitter for one choice (parsers hold stream state)."""
        return ReasoningStream(
            self._parser(switches),
            self._request,
            list(prompt_token_ids),
            self._markers,
            self._tokenizer.decode,
            self._history_free,
        )


@dataclass(frozen=True)
class ReasoningPlan:
    parsing: ReasoningParsing
    switches: dict[str, Any]  # the chat template's switches, which some parsers read
    include: bool  # the client's include_reasoning
    # False: every output token is content (the prompt closed the reasoning, or a constraint
    # applies from the first token).
    split: bool


@dataclass
class ReasoningStream:
    """One choice's deltas split as they come: each into the reasoning text it carries and a
    delta of the content only, which the rest of the stream handles as it would any output.

    vLLM's parsers are written for one token per delta; an engine ahead of its client merges
    deltas, and a whole output is one. So each delta reaches the parser cut at its marker
    tokens (<think> and </think> each alone): then a marker sharing a delta with text neither
    leaks into the reasoning nor hides text beside it, and a whole body splits as a stream
    does. Once the reasoning has ended the rest is content without the parser (which re-reads
    its whole history on every delta)."""

    _parser: Any
    _request: Any
    _prompt: list[int]
    _markers: dict[int, str]  # marker token id → its text
    _decode: Callable[[list[int]], str]
    _history_free: bool = False  # the parser reads of its history only the marker tokens
    _answering: bool = False  # the reasoning has ended: the rest is all content
    _reasoned: bool = False  # some reasoning was returned
    # Tokens the parser took without a word yet (the start of what may be a call's marker,
    # which ends Qwen3's reasoning): they go to whichever side its next words are on.
    _pending: list[Token] = field(default_factory=list)
    # A marker token whose text has not come yet, with the text and tokens after it.
    _waiting_text: str = ""
    _waiting_tokens: list[Token] = field(default_factory=list)
    reasoning_tokens: int = 0

    def split(self, delta: ChoiceDelta) -> tuple[str, list[TokenLogprob] | None, ChoiceDelta]:
        """(reasoning text, its tokens' logprobs, a delta of the content only): the content
        delta keeps the finish and its own tokens' logprobs; the markers' go with the
        reasoning."""
        if self._answering:
            return "", None, delta
        reasoning, content = "", ""
        said_tokens: list[Token] = []
        answer_tokens: list[Token] = []
        finished = delta.finish_reason is not None
        logprobs = delta.logprobs if delta.logprobs is not None else [None] * len(delta.token_ids)
        pieces, self._waiting_text, self._waiting_tokens = _at_markers(
            self._waiting_text + delta.text,
            self._waiting_tokens + list(zip(delta.token_ids, logprobs, strict=False)),
            self._markers,
            self._decode,
            finished,
        )
        for number, (text, tokens) in enumerate(pieces):
            if self._answering:
                content += text
                answer_tokens += tokens
                continue
            said, answered = self._parse(text, tokens, finished and number == len(pieces) - 1)
            reasoning += said
            content += answered
            waiting, self._pending = self._pending + tokens, []
            marker = len(tokens) == 1 and tokens[0][0] in self._markers
            if answered and said:  # the reasoning ends inside these tokens
                cut = self._boundary([token for token, _ in waiting], len(said))
                said_tokens += waiting[:cut]
                answer_tokens += waiting[cut:]
            elif answered:
                answer_tokens += waiting
            elif marker or self._answering:
                said_tokens += waiting
            elif said:  # the parser may hold the end back (what may open a call's marker)
                cut = self._boundary([token for token, _ in waiting], len(said))
                said_tokens += waiting[:cut]
                self._pending = waiting[cut:]
            else:
                self._pending = waiting
        if finished:
            said_tokens += self._pending
            self._pending = []
        self.reasoning_tokens += len(said_tokens)
        said_logprobs = [lp for _, lp in said_tokens if lp is not None]
        answer_logprobs = [lp for _, lp in answer_tokens if lp is not None]
        with_logprobs = delta.logprobs is not None
        return (
            reasoning,
            said_logprobs if with_logprobs else None,
            replace(
                delta,
                text=content,
                token_ids=[token for token, _ in answer_tokens],
                logprobs=answer_logprobs if with_logprobs else None,
            ),
        )

    def _boundary(self, tokens: list[int], reasoning_chars: int) -> int:
        """How many of `tokens` the reasoning's last `reasoning_chars` characters took: the
        fewest whose text is that long (the rest are the answer's)."""
        low, high = 0, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if len(self._decode(tokens[:middle])) >= reasoning_chars:
                high = middle
            else:
                low = middle + 1
        return low

    def _parse(self, text: str, tokens: list[Token], finished: bool) -> tuple[str, str]:
        ids = [token for token, _ in tokens]
        message = self._parser.parse_delta(
            text, ids, self._request, self._prompt, finished=finished
        )
        said = (message.reasoning if message is not None else None) or ""
        answered = (message.content if message is not None else None) or ""
        if said and not self._reasoned:
            self._reasoned = True
            # A parser that failed to cut the opening marker off (the text around it did not
            # split at it).
            opening = getattr(self._parser.reasoning_parser, "reasoning_start_str", None)
            if opening and said.startswith(opening):
                said = said[len(opening) :]
        state = getattr(self._parser, "_stream_state", None)  # vLLM 0.32's Parser
        ended = state.reasoning_ended if state is not None else bool(answered)
        if self._history_free and state is not None:
            # vLLM's parser concatenates its whole history on every delta (32k tokens of
            # DeepSeek R1 reasoning took 11 s of the event loop); these parsers read only
            # whether a marker token came before, so the history keeps the markers alone.
            state.previous_text = ""
            state.previous_token_ids = [t for t in state.previous_token_ids if t in self._markers]
        # The parser's state, not the text: the first answer token may carry no text yet
        # (half a UTF-8 character), and its logprob belongs to the answer.
        self._answering = bool(ended)
        return said, answered


def _at_markers(
    text: str,
    tokens: list[Token],
    markers: dict[int, str],
    decode: Callable[[list[int]], str],
    finished: bool,
) -> tuple[list[tuple[str, list[Token]]], str, list[Token]]:
    """The text and its tokens as (text, tokens) pieces cut before and after each marker
    token, and what must wait for the next delta: a marker token whose text has not come yet
    (vLLM holds streamed text back behind a client's stop strings), with what follows it. At
    the end, a marker whose text never shows leaves the rest as one piece."""
    if not markers or not any(token in markers for token, _ in tokens):
        return [(text, tokens)], "", []
    pieces: list[tuple[str, list[Token]]] = []
    text_at, token_at = 0, 0
    for position, (token, _) in enumerate(tokens):
        if token not in markers:
            continue
        marker = markers[token]
        # Where the tokens before it end: the model may have spelled the marker out in
        # ordinary tokens before the real one, where a search would stop.
        expected = text_at + len(decode([t for t, _ in tokens[token_at:position]]))
        found = expected if text.startswith(marker, expected) else text.find(marker, text_at)
        if found < 0:
            if finished:
                break
            return pieces, text[text_at:], tokens[token_at:]
        if found > text_at or position > token_at:
            pieces.append((text[text_at:found], tokens[token_at:position]))
        end = found + len(marker)
        pieces.append((text[found:end], tokens[position : position + 1]))
        text_at, token_at = end, position + 1
    if token_at < len(tokens) or text_at < len(text):
        pieces.append((text[text_at:], tokens[token_at:]))
    return pieces, "", []
