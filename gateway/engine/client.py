"""The engine-client seam: what the gateway needs from an inference engine, nothing more.

Routes and services speak only these types, so a remote-engine backend (vLLM servers over HTTP)
can be added beside the embedded one without touching them. Prompts cross the seam as token ids:
the gateway owns tokenization and chat templates. Adapters cross it as an engine id plus a local
path resolved by the gateway — never a client-supplied name.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class EngineError(Exception):
    """The engine failed this request (not the client's fault)."""


class EngineDead(EngineError):
    """The engine is gone; no request can be served until the gateway restarts."""


class EngineStalled(EngineError):
    """The engine did not answer a call in time; it may still carry it out."""


class EngineRejected(Exception):
    """The engine refused the request as invalid (client's fault)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self._param = param

    @property
    def param(self) -> str | None:
        """The request field at fault: as given, else the one the engine's own error names
        (vLLM's VLLMValidationError.parameter), however deep in the chain of causes."""
        if self._param is not None:
            return self._param
        cause, seen = self.__cause__, set()
        while cause is not None and id(cause) not in seen:  # a chain can loop back on itself
            seen.add(id(cause))
            parameter = getattr(cause, "parameter", None)
            if isinstance(parameter, str):
                return parameter
            cause = cause.__cause__
        return None


@dataclass(frozen=True)
class AdapterHandle:
    """A servable adapter version as the engine sees it."""

    engine_id: int  # > 0, unique per adapter version for the engine's lifetime
    path: str  # local directory holding adapter_config.json + adapter_model.safetensors
    size_bytes: int = 0  # weight bytes, for the host cache's byte budget

    @property
    def engine_name(self) -> str:
        return f"adapter-{self.engine_id}"


@dataclass(frozen=True)
class OutputConstraint:
    """What every output token must keep the text within (vLLM's structured outputs)."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
    # json: the schema as JSON text; regex, grammar: the pattern; choice: the options;
    # json_object: None (any JSON object); structural_tag: xgrammar's structural tag as JSON
    # text (tool_choice "auto" with strict tools: gateway.engine.tool_parsing).
    spec: str | tuple[str, ...] | None
    # The request field it came from ("response_format", "structured_outputs"): an error about
    # the constraint names it.
    param: str


@dataclass(frozen=True)
class LoopGuard:
    """End an output that repeats one n-gram of `min_pattern`..`max_pattern` tokens
    `min_count` times in a row (vLLM's repetition detection; finish_reason "repetition")."""

    max_pattern: int
    min_pattern: int
    min_count: int


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    # None: the engine's own default.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: no top-k
    min_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # number of top alternatives; 0 = chosen token only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0  # EOS and stops do not end a choice before it has this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    ignore_eos: bool = False
    # False: the engine reports each choice once, when finished (no per-token work in the
    # gateway process for non-streaming requests).
    stream: bool = True
    # Not sampling, but per request like it: prompts reuse cached KV blocks only of requests
    # with the same salt (vLLM's cache_salt). The gateway sets the tenant, so how fast a prompt
    # starts cannot tell one tenant what another has sent.
    cache_salt: str | None = None
    constraint: OutputConstraint | None = None
    loop_guard: LoopGuard | None = None
    # False: special tokens stay in the output text (a tool-call parser whose markers are
    # special tokens must see them).
    skip_special_tokens: bool = True
    # With a reasoning parser (LORAPLEX_REASONING_PARSER) and a constraint: False, the
    # constraint applies from where the output's reasoning ends (the engine watches for it
    # with the parser, given the chat template's switches, which some parsers read); True or
    # None, from the first token (a completion has no reasoning).
    reasoning_ended: bool | None = None
    reasoning_switches: dict[str, Any] | None = None
    # The prompt's token logprobs under the request's adapter, summed into
    # GenerationUpdate.prompt_surprisal (gateway/prompt_drift.py); the engine then reads no
    # prefix cache for the request.
    prompt_logprobs: bool = False
    # A completion's echo with logprobs: every prompt token's logprob with this many top
    # alternatives, in GenerationUpdate.prompt_logprobs (the engine reads no prefix cache).
    echo_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # What stopped it, when finish_reason is "stop": the stop string or token id that matched
    # (vLLM's stop_reason); None for the model's end-of-sequence.
    stop_reason: str | int | None = None


@dataclass
class GenerationUpdate:
    prompt_tokens: int
    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False
    # Prompt tokens the engine took from its prefix cache instead of computing them (OpenAI's
    # usage.prompt_tokens_details.cached_tokens); None when the engine does not say.
    cached_prompt_tokens: int | None = None
    # When the engine made the request's first token, on time.perf_counter's clock; None when
    # it does not say. A non-streamed request's only update comes at its end: without this,
    # its time to first token would be its whole latency.
    first_token_at: float | None = None
    # With SamplingOptions.prompt_logprobs, once: (sum of the prompt tokens' negative logprobs,
    # tokens scored: every prompt token after the first).
    prompt_surprisal: tuple[float, int] | None = None
    # With SamplingOptions.echo_logprobs, once: per prompt token, its logprob and alternatives;
    # None where the engine scores none (the first token, which nothing precedes).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class EngineHealth:
    alive: bool
    detail: dict[str, Any] = field(default_factory=dict)
    # Dead for good (the engine core exited or failed): it will not come back, unlike an
    # engine merely slow to answer a probe (alive False, dead False).
    dead: bool = False


class EngineClient(Protocol):
    max_model_len: int
    # The dtype the engine holds LoRA weights in, as torch names it ("float16"); known once
    # started, None before (the registry judges adapters' values against it).
    lora_dtype: str | None
    # Whether a request may be sent with its adapter's load still in flight: the engine loads
    # a request's adapter before scheduling it and refuses the request (finish reason "error")
    # when that load fails (loraplex's plugin, kernels.engine_core_loads). Known once started.
    loads_adapters_on_arrival: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
    ) -> AsyncGenerator[GenerationUpdate]:
        """Stream deltas; raises EngineRejected, EngineDead or EngineError. Closing the
        generator before its last update aborts the request in the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: AdapterHandle) -> None: ...

    def start_adapter_load(self, adapter: AdapterHandle) -> Awaitable[None]:
        """Send the load now, ahead of any request sent after this returns, and return its
        answer (raising as add_adapter does). For engines that load adapters on arrival."""
        ...

    def start_adapter_removal(self, engine_id: int) -> Awaitable[None]:
        """remove_adapter, sent now as start_adapter_load is."""
        ...

    async def remove_adapter(self, engine_id: int) -> None: ...

    async def health(self) -> EngineHealth: ...

    async def adapter_pool(self) -> dict[str, Any] | None:
        """The engine's paged adapter pool counters (kernels.paged_stats.PagedPoolStats
        snapshot), or None when the engine keeps vLLM's own slot buffers."""
        ...

    async def residency_waits(self) -> list[float]:
        """Seconds each request the paged pool's admission held back waited for its adapter's
        pages, for requests started since the last call (drained); [] without paged mode."""
        ...

    def default_sampling(self) -> dict[str, Any]:
        """The model's own generation defaults (generation_config.json), e.g. temperature."""
        ...
