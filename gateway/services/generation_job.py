"""One admitted generation request and its results: what the engine will run, and what it holds
while running (the tenant's limits lease, the adapter pin, its metrics and monitor hook)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.adapter_cache import HostAdapterCache
from gateway.catalog import ServedModel
from gateway.engine.client import GenerationUpdate, SamplingOptions, TokenLogprob
from gateway.engine.reasoning_parsing import ReasoningPlan
from gateway.engine.tool_parsing import AutoToolPlan
from gateway.limits import Lease
from gateway.request_metrics import GenerationRecorder
from gateway.rollout_controller import RolloutController
from gateway.services.prompts import EchoLogprob
from gateway.services.tool_call_checks import CallChecker
from gateway.services.tool_calls import ForcedCall
from gateway.shadow import ShadowPlan

logger = logging.getLogger(__name__)

# A choice's first calls judged (a client's schema on the event loop: bounded work per choice).
MAX_JUDGED_CALLS = 16


@dataclass
class GenerationJob:
    request_id: str
    kind: str  # "chat.completion" | "text_completion"
    model: str  # the name the client asked for, echoed back in responses
    served: ServedModel
    prompts: list[list[int]]
    options: SamplingOptions
    created: int = field(default_factory=lambda: int(time.time()))
    echo_texts: list[str] | None = None  # completions with echo=true
    # >1 when greedy n was fanned out: each prompt appears `copies` times in a row with n=1.
    copies: int = 1
    # Chat with a forced tool call: its output is returned as tool_calls, not content.
    forced_call: ForcedCall | None = None
    # Chat with tools and tool_choice "auto": calls the parser finds become tool_calls.
    auto_calls: AutoToolPlan | None = None
    call_checker: CallChecker | None = None  # judges those calls for loraplex_tool_calls
    # Chat with a reasoning parser: the output's reasoning is returned apart from its content.
    reasoning: ReasoningPlan | None = None
    # The rollout role the version served in, for a request that judges it (0: none).
    role_tag: int = 0
    # Set by admission: the tenant's limits lease, this request's metrics, the adapter pin.
    lease: Lease | None = None
    recorder: GenerationRecorder | None = None
    cache: HostAdapterCache | None = None
    adapter_load: asyncio.Task[None] | None = None  # the pinned adapter's load, if in flight
    controller: RolloutController | None = None
    shadow: ShadowPlan | None = None  # a copy for the adapter's shadow, sent once complete
    # Prompt index → prompt tokens the engine served from its prefix cache, as reported.
    cached_by_prompt: dict[int, int] = field(default_factory=dict)
    # False once it failed before the client got any of its output (the engine refused it or
    # died, its adapter failed to load; a non-streamed request's output comes only at its
    # end): the tenant's tokens are refunded.
    ran: bool = True

    def finish(self) -> None:
        """Release the tenant's lease (refunding unused tokens), close the metrics and feed the
        rollout monitor. Idempotent: every exit path calls it."""
        completion = 0
        if self.recorder is not None:
            first_time = not self.recorder.finished
            self.recorder.finish()
            completion = self.recorder.completion_tokens
            if first_time and self.controller is not None:
                self.controller.observe(
                    self.served.adapter_name,
                    self.served.version,
                    self.recorder,
                    judged=self.served.judged_by(self.recorder.scope.tenant),
                )
        if self.lease is not None:
            self.lease.release(completion, ran=self.ran)
        if self.cache is not None and self.served.adapter is not None:
            self.cache.release(self.served.adapter)
            self.cache = None  # released once

    def judge_tool_calls(self, index: int, calls: list[tuple[str, str]], malformed: bool) -> None:
        """The calls choice `index` wrote under tool_choice auto (auto_tool_calls.calls_to_judge):
        each counted by outcome (at most MAX_JUDGED_CALLS), and the choice one piece of evidence
        about the version for its rollout (RolloutController.tool_call): valid when every call
        judged is. A greedy choice's copies (fan_out_greedy) are judged once."""
        if self.call_checker is None or self.recorder is None:
            return
        if self.copies > 1 and (index // self.options.n) % self.copies:
            return
        try:
            judged = [self.call_checker.outcome(*call) for call in calls[:MAX_JUDGED_CALLS]]
        except Exception:  # judging must never cost the client its answer
            logger.exception("could not judge the tool calls of %s", self.request_id)
            return
        outcomes = [outcome for outcome in judged if outcome is not None]
        if malformed:
            outcomes.append("malformed")
        for outcome in outcomes:
            self.recorder.tool_call(outcome)
        if outcomes and self.controller is not None:
            self.controller.tool_call(
                self.served.adapter_name,
                self.served.version,
                all(outcome == "valid" for outcome in outcomes),
                judged=self.served.judged_by(self.recorder.scope.tenant),
                role_tag=self.role_tag,
            )

    def sub_request_id(self, prompt_index: int) -> str:
        return f"{self.request_id}-{prompt_index}"

    def choice_index(self, prompt_index: int, choice: int) -> int:
        return prompt_index * self.options.n + choice

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) // self.copies

    @property
    def cached_prompt_tokens(self) -> int | None:
        """Of `prompt_tokens`, those served from the prefix cache; None if the engine never
        said. A fanned-out prompt counts once, with what every copy of it found cached."""
        if not self.cached_by_prompt:
            return None
        per_prompt = [
            min(self.cached_by_prompt.get(p * self.copies + c, 0) for c in range(self.copies))
            for p in range(len(self.prompts) // self.copies)
        ]
        return sum(per_prompt)


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # what stopped it (ChoiceDelta.stop_reason)
    # A completion's echo with logprobs: its prompt's tokens (PromptBuilder.echo_logprobs).
    prompt_logprobs: list[EchoLogprob] | None = None


class ChoiceResults:
    """A non-streamed job's choices, gathered from its updates. `echo_logprobs`: a prompt's
    token logprobs as its echo shows them (PromptBuilder.echo_logprobs)."""

    def __init__(
        self,
        job: GenerationJob,
        echo_logprobs: Callable[[list[int], list[TokenLogprob | None]], list[EchoLogprob]],
    ):
        self._job = job
        self._echo_logprobs = echo_logprobs
        self._choices = {
            job.choice_index(p, c): ChoiceResult(job.choice_index(p, c))
            for p in range(len(job.prompts))
            for c in range(job.options.n)
        }

    def add(self, prompt_index: int, update: GenerationUpdate) -> None:
        job = self._job
        if update.prompt_logprobs is not None:
            echo = self._echo_logprobs(job.prompts[prompt_index], update.prompt_logprobs)
            for c in range(job.options.n):
                self._choices[job.choice_index(prompt_index, c)].prompt_logprobs = echo
        for delta in update.choices:
            choice = self._choices[job.choice_index(prompt_index, delta.index)]
            choice.text += delta.text
            choice.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None:
                choice.logprobs = (choice.logprobs or []) + delta.logprobs
            if delta.finish_reason:
                choice.finish_reason = delta.finish_reason
                choice.stop_reason = delta.stop_reason

    def in_order(self) -> list[ChoiceResult]:
        return [self._choices[i] for i in sorted(self._choices)]


class Primed(AsyncGenerator[tuple[int, GenerationUpdate], None]):
    """A job's updates whose first was already taken (to fail before the response started).

    Not a generator wrapping the rest: an async generator never started runs no `finally`
    when closed, so a response cancelled before its first chunk would leave the engine
    request and the job open. Closing this always reaches the started stream."""

    def __init__(
        self,
        first: tuple[int, GenerationUpdate] | None,
        rest: AsyncGenerator[tuple[int, GenerationUpdate]],
    ):
        self._first = first
        self._rest = rest

    async def asend(self, value: None) -> tuple[int, GenerationUpdate]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)

    async def athrow(self, *args: Any) -> tuple[int, GenerationUpdate]:
        return await self._rest.athrow(*args)

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


def fan_out_greedy(
    prompts: list[list[int]], options: SamplingOptions
) -> tuple[list[list[int]], SamplingOptions, int]:
    """OpenAI accepts n > 1 with temperature 0 (n identical choices); vLLM refuses it. Submit
    one greedy request per choice instead; prefix caching makes the copies cheap."""
    if options.n == 1 or options.temperature != 0:
        return prompts, options, 1
    copies = options.n
    expanded = [prompt for prompt in prompts for _ in range(copies)]
    return expanded, replace(options, n=1), copies


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
