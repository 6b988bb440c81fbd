"""A reasoning model's chat output as OpenAI-style servers return it: the reasoning apart from
the content (`message.reasoning`, stream deltas' `reasoning`, vLLM's field), its token count in
usage.completion_tokens_details.reasoning_tokens, and nothing of it when the client sent
include_reasoning false. Only the content goes on to tool calls and forced calls.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

from gateway.engine.client import ChoiceDelta, OutputConstraint, TokenLogprob
from gateway.engine.reasoning_parsing import ReasoningParsing, ReasoningPlan, ReasoningStream
from gateway.errors import InvalidRequest
from gateway.schemas.openai import ChatCompletionRequest
from gateway.services.generation_job import ChoiceResult, GenerationJob

logger = logging.getLogger(__name__)


async def reasoning_plan(
    parsing: ReasoningParsing | None,
    body: ChatCompletionRequest,
    prompt: list[int],
    constraint: OutputConstraint | None,
) -> tuple[ReasoningPlan | None, bool | None]:
    """The request's plan and what the engine is told (SamplingOptions.reasoning_ended).

    As vLLM's server decides it: a constraint starts where the reasoning ends, unless the
    prompt already ended it or the client wants no reasoning back (include_reasoning false:
    then from the first token, and the output holds none)."""
    if parsing is None:
        return None, None
    switches = body.template_switches()
    try:
        # In a thread: the parser scans the prompt for its markers (a long one takes ms).
        ended = await asyncio.to_thread(parsing.ended_in, prompt, switches)
    except Exception as exc:
        # Parsers read some switches themselves (Qwen3's enable_thinking, as a cache key:
        # a list there raised TypeError); any other failure is the switches' too.
        raise InvalidRequest(
            f"The reasoning parser cannot take these chat_template_kwargs: {exc!r}",
            param="chat_template_kwargs",
        ) from exc
    from_first_token = ended or not body.include_reasoning
    plan = ReasoningPlan(
        parsing,
        switches,
        body.include_reasoning,
        split=not ended and not (constraint is not None and from_first_token),
    )
    return plan, (from_first_token if constraint is not None else None)


def split_whole(
    job: GenerationJob, choice: ChoiceResult
) -> tuple[str | None, ChoiceResult, int, list[TokenLogprob] | None]:
    """(reasoning as returned, the choice's content, reasoning tokens, the logprobs returned)."""
    plan = job.reasoning
    if plan is None or not plan.split:
        return None, choice, 0, choice.logprobs
    prompt = job.prompts[choice.index // job.options.n]
    try:
        split = plan.parsing.whole(
            choice.text, choice.token_ids, prompt, plan.switches, choice.logprobs
        )
    except Exception:  # a parser's bug must not cost the client the answer the model gave
        logger.exception("the reasoning parser %s failed; answering as text", plan.parsing.name)
        return None, choice, 0, choice.logprobs
    content = replace(
        choice,
        text=split.content,
        token_ids=split.content_token_ids,
        logprobs=split.content_logprobs,
    )
    if not plan.include:
        return None, content, split.reasoning_tokens, split.content_logprobs
    return split.reasoning, content, split.reasoning_tokens, choice.logprobs


@dataclass
class ReasoningChunks:
    """Each choice's stream deltas split as they come: chunks of reasoning, and a delta of the
    content for the rest of the stream to shape."""

    job: GenerationJob
    plan: ReasoningPlan
    _streams: dict[int, ReasoningStream] = field(default_factory=dict)
    _failed: set[int] = field(default_factory=set)

    def split(
        self, index: int, delta: ChoiceDelta
    ) -> tuple[list[tuple[str, list[TokenLogprob] | None]], ChoiceDelta | None]:
        """([(reasoning, its logprobs)] to send, the content delta; None when it carries
        nothing)."""
        if not self.plan.split or index in self._failed:
            return [], delta
        try:
            stream = self._streams.get(index)
            if stream is None:
                prompt = self.job.prompts[index // self.job.options.n]
                stream = self.plan.parsing.stream(prompt, self.plan.switches)
                self._streams[index] = stream
            reasoning, logprobs, content = stream.split(delta)
        except Exception:  # as a whole body does: the rest of the output is content
            logger.exception("the reasoning parser %s failed mid-stream", self.plan.parsing.name)
            self._failed.add(index)
            return [], delta
        # A marker's token carries no reasoning text, but its logprob, as in a whole body.
        said = self.plan.include and (reasoning or logprobs)
        chunks = [(reasoning, logprobs)] if said else []
        if not (content.text or content.token_ids or content.logprobs or content.finish_reason):
            return chunks, None
        return chunks, content

    def tokens(self) -> int:
        return sum(stream.reasoning_tokens for stream in self._streams.values())
