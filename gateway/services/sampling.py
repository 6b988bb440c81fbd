"""Sampling options for one OpenAI request, resolved as vLLM's own server resolves them: the
client's values, else the model's generation defaults (generation_config.json, as vLLM's
get_diff_sampling_param reports it), else vLLM's; the completion budget within the context and
the key's limits."""

from __future__ import annotations

from typing import Any

from gateway.engine.client import EngineClient, LoopGuard, SamplingOptions
from gateway.errors import ContextLengthExceeded, InvalidRequest, LoraplexError
from gateway.limits import effective_max_tokens
from gateway.schemas.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.services.prompts import PromptBuilder
from registry.service import Principal

# The model's defaults the client's fields fall back on, by the name both use.
MODEL_DEFAULTED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


class SamplingResolver:
    def __init__(
        self,
        engine: EngineClient,
        prompts: PromptBuilder,
        *,
        prefix_cache_per_tenant: bool = True,
        loop_guard: LoopGuard | None = None,
        echo_logprobs_max_prompt_tokens: int = 8192,
    ):
        """`loop_guard`: the deployment's, for requests that send no repetition_detection.
        `echo_logprobs_max_prompt_tokens`: the most prompt tokens (over its prompts) a
        completion may echo with logprobs: each is an entry with its alternatives in the
        answer, and the engine computes the logits of every prompt position."""
        self._loop_guard = loop_guard
        self._echo_max_tokens = echo_logprobs_max_prompt_tokens
        self._engine = engine  # its max_model_len is the context (known once it started)
        self._prompts = prompts
        self._defaults = engine.default_sampling()
        self._prefix_cache_per_tenant = prefix_cache_per_tenant

    @property
    def model_max_tokens(self) -> int | None:
        """The model's own completion budget (its max_new_tokens), if it has one."""
        value = self._defaults.get("max_tokens")
        return value if isinstance(value, int) and value >= 1 else None

    def options(
        self,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        caller: Principal,
        *,
        default_max_tokens: int | None = None,
        max_tokens_param: str = "max_tokens",
    ) -> SamplingOptions:
        """`default_max_tokens`: the budget when the client sent none (None: all the room);
        the key's limits bound it as they bound the room. `max_tokens_param`: the field the
        client sent the budget in, which errors about it name."""
        budget = self._budget(
            body, prompts, max_tokens, caller, default_max_tokens, max_tokens_param
        )
        if body.min_tokens > budget:
            raise InvalidRequest(
                f"min_tokens ({body.min_tokens}) must be at most max_tokens ({budget}).",
                param="min_tokens",
            )
        constraint = body.output_constraint()
        if constraint is not None:
            check_constrainable(body)
        picked: dict[str, Any] = {
            name: _first(getattr(body, name), self._defaults.get(name)) for name in MODEL_DEFAULTED
        }
        return SamplingOptions(
            echo_logprobs=self._echo_logprobs(body, prompts, logprobs),
            max_tokens=budget,
            n=body.n,
            seed=body.seed,
            stop=body.stop_list(),
            stop_token_ids=self._prompts.stop_token_ids(body.stop_token_ids),
            logprobs=logprobs,
            min_tokens=body.min_tokens,
            logit_bias=self._prompts.logit_bias(body.logit_bias),
            ignore_eos=body.ignore_eos,
            stream=body.stream,
            cache_salt=caller.tenant if self._prefix_cache_per_tenant else None,
            constraint=constraint,
            loop_guard=(
                body.repetition_detection.guard()
                if body.repetition_detection is not None
                else self._loop_guard
            ),
            **picked,
        )

    def _echo_logprobs(
        self, body: SamplingFields, prompts: list[list[int]], logprobs: int | None
    ) -> int | None:
        """A completion's echo with logprobs (what an eval harness scores answers with): the
        prompt's logprobs, with as many alternatives as the completion's."""
        if not isinstance(body, CompletionRequest) or not body.echo or logprobs is None:
            return None
        if body.stream:
            raise InvalidRequest(
                "echo with logprobs is not supported when streaming", param="stream"
            )
        if body.n != 1:  # vLLM would score the whole prompt again for every sequence
            raise InvalidRequest("echo with logprobs takes n = 1", param="n")
        total = sum(len(p) for p in prompts)
        if total > self._echo_max_tokens:
            raise InvalidRequest(
                f"echo with logprobs scores every prompt token: at most "
                f"{self._echo_max_tokens} prompt tokens per request "
                f"(LORAPLEX_ECHO_LOGPROBS_MAX_PROMPT_TOKENS); this one has {total}",
                param="prompt",
            )
        return logprobs

    def _budget(
        self,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        caller: Principal,
        default_max_tokens: int | None,
        max_tokens_param: str,
    ) -> int:
        limit = self._engine.max_model_len
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens; the prompt has {longest}.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
        room = limit - longest
        if max_tokens is None and default_max_tokens is not None:
            room = min(room, default_max_tokens)
        elif max_tokens is not None and max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or the completion length.",
                param=max_tokens_param,
            )
        try:
            return effective_max_tokens(
                caller.tenant,
                caller.policy,
                max_tokens,
                room,
                prompt_tokens=sum(len(p) for p in prompts),
                sequences=len(prompts) * body.n,
            )
        except LoraplexError as exc:
            if exc.param == "max_tokens":  # the limiter knows the field by one name only
                exc.param = max_tokens_param
            raise


def check_constrainable(body: SamplingFields) -> None:
    """Options that would let the output break its constraint are refused (vLLM's server takes
    them): measured on vLLM 0.32, ignore_eos generated free text after the constrained part, and
    min_tokens was silently ignored once the constraint ended the output."""
    if body.ignore_eos:
        raise InvalidRequest(
            "ignore_eos cannot be combined with structured outputs: the output would run on "
            "past the end of the constrained text.",
            param="ignore_eos",
        )
    if body.min_tokens:
        raise InvalidRequest(
            "min_tokens cannot be combined with structured outputs: the constraint decides "
            "where the output ends.",
            param="min_tokens",
        )


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
