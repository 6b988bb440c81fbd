"""Token ids from what a client sent: chat messages through the model's chat template, or
completion prompts (text or token ids), checked against the tokenizer and the context.

Tokenizing runs off the event loop: a long prompt's template and encode take seconds, during
which every other stream would stall.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.engine.client import EngineClient, TokenLogprob
from gateway.errors import ContextLengthExceeded, InvalidRequest

# Far more characters than any tokenizer packs into one token (English averages ~4). Text
# longer than this many per token of the context cannot fit, and is refused before it is
# tokenized: a 2.7 MB prompt took seconds to encode, only to be refused as too long.
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class EchoLogprob:
    """One prompt token of an echo: its text, logprob and top alternatives (None for the first
    token, which nothing precedes, as OpenAI's and vLLM's servers give it)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None


class PromptBuilder:
    def __init__(self, tokenizer: Any, engine: EngineClient):
        self._tokenizer = tokenizer
        self._engine = engine  # its max_model_len is the context (known once it started)

    async def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        switches: dict[str, Any] | None = None,
    ) -> list[int]:
        """`tools`: the function definitions the template renders (transformers' `tools=`);
        `switches`: the client's chat_template_kwargs, of which the template gets those it
        reads (as vLLM's server: a switch another model's template has is no error)."""
        template = getattr(self._tokenizer, "chat_template", None)
        if template is None:
            raise InvalidRequest("This model has no chat template; use /v1/completions.")
        size = sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""))) for m in messages)
        extra = len(json.dumps(tools or "")) + len(json.dumps(switches or "", default=str))
        self._refuse_far_too_long([size + extra], "messages")
        if not _knows_developer_role(template):
            messages = _developer_as_system(messages)
        read = template_variables(template)
        kwargs = {name: value for name, value in (switches or {}).items() if name in read}
        return await asyncio.to_thread(self._chat_ids, messages, tools, kwargs)

    async def completion(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[list[int]]:
        texts = [prompt] if isinstance(prompt, str) else prompt
        self._refuse_far_too_long([len(t) for t in texts if isinstance(t, str)], "prompt")
        return await asyncio.to_thread(self._completion_prompts, prompt)

    def _chat_ids(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        kwargs: dict[str, Any],
    ) -> list[int]:
        # transformers renders chat templates with jinja2, which it imports only to do so.
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except TemplateSyntaxError:
            raise  # the model's template is broken: the server's fault, a 500
        except TemplateError as exc:
            # The template refuses this conversation (no system role, roles must alternate):
            # its message is the reason, and the client can change the conversation.
            raise InvalidRequest(
                f"The model's chat template refused these messages: {exc}", param="messages"
            ) from exc
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            if not kwargs:
                raise
            # A switch of a type the template cannot use (a list where it adds a number).
            raise InvalidRequest(
                f"The model's chat template failed on chat_template_kwargs: {exc}",
                param="chat_template_kwargs",
            ) from exc
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _refuse_far_too_long(self, lengths: Sequence[int], param: str) -> None:
        limit = self._engine.max_model_len
        longest = max(lengths, default=0)
        if longest > MAX_CHARS_PER_TOKEN * limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{longest} characters, far more than that many tokens can hold.",
                param=param,
            )

    def _completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if all(isinstance(item, int) for item in prompt):
            return [self._check_ids(list(prompt))]  # type: ignore[arg-type]
        return [
            self._encode(item) if isinstance(item, str) else self._check_ids(list(item))  # type: ignore[arg-type]
            for item in prompt
        ]

    def echo_texts(self, prompt: object, token_prompts: list[list[int]]) -> list[str]:
        """What the client sent: its strings verbatim, token-id prompts decoded."""
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
            return list(prompt)  # type: ignore[arg-type]
        return [self._tokenizer.decode(p, skip_special_tokens=True) for p in token_prompts]

    def echo_logprobs(
        self, token_ids: list[int], entries: list[TokenLogprob | None]
    ) -> list[EchoLogprob]:
        """A prompt's token logprobs as an echo shows them: the tokens the engine did not score
        (the first) decoded here, as vLLM's server decodes them."""
        return [
            EchoLogprob(self._tokenizer.decode([token_id]), None, None)
            if entry is None
            else EchoLogprob(entry.token, entry.logprob, entry.top)
            for token_id, entry in zip(token_ids, entries, strict=False)
        ]

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text)
        return ids

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = len(self._tokenizer)
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise InvalidRequest(f"token ids must be non-empty and in [0, {vocab})", param="prompt")
        return ids

    def stop_token_ids(self, ids: list[int] | None) -> tuple[int, ...]:
        vocab = len(self._tokenizer)
        if any(not 0 <= i < vocab for i in ids or ()):
            raise InvalidRequest(
                f"stop_token_ids must be token ids in [0, {vocab}).", param="stop_token_ids"
            )
        return tuple(ids or ())

    def logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        vocab = len(self._tokenizer)
        pairs = []
        for key, value in (bias or {}).items():
            # ASCII digits only: no sign, no spaces, and not "²" or "١٢", which isdigit() accepts;
            # and no more digits than the largest id has (leading zeros aside, as int() reads
            # them): int() raises past 4300 of them.
            digits = key.lstrip("0") or "0"
            plain = key.isascii() and key.isdigit() and len(digits) <= len(str(vocab - 1))
            token = int(digits) if plain else -1
            if not 0 <= token < vocab:
                shown = key if len(key) <= 32 else f"{key[:32]}..."  # the client's, echoed
                raise InvalidRequest(
                    f"logit_bias keys must be token ids in [0, {vocab}); got {shown!r}.",
                    param="logit_bias",
                )
            pairs.append((token, value))
        return tuple(pairs)


@functools.lru_cache(maxsize=8)
def _variables_of(text: str) -> frozenset[str]:
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return frozenset(meta.find_undeclared_variables(Environment().parse(text)))
    except TemplateSyntaxError:
        return frozenset()  # rendering it fails the request with the template's own error


def template_variables(template: str | dict[str, str]) -> frozenset[str]:
    """The names a chat template reads that it does not set itself (enable_thinking, ...);
    of a model's named templates, any (transformers picks "tool_use" when tools are sent)."""
    if isinstance(template, str):
        return _variables_of(template)
    return frozenset().union(*(_variables_of(text) for text in template.values()))


def _knows_developer_role(template: str | dict[str, str]) -> bool:
    """Whether the chat template handles the `developer` role itself, judged as vLLM's server
    judges it (renderers/hf.py): by the role's name, quoted, in the template's text."""
    text = template if isinstance(template, str) else template.get("default", "")
    return '"developer"' in text or "'developer'" in text


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What vLLM's server does for a template without the `developer` role: developer messages
    become system messages, then every system message is merged into one at the start (some
    templates, Qwen's among them, take a system message only first)."""
    if not any(m["role"] == "developer" for m in messages):
        return messages
    converted = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    systems = [m for m in converted if m["role"] == "system"]
    if len(systems) == 1 and converted[0]["role"] == "system":
        return converted
    merged = "\n\n".join(m["content"] for m in systems if m["content"])
    return [{"role": "system", "content": merged}, *(m for m in converted if m["role"] != "system")]
