"""Turns an OpenAI request into engine work: resolve the model, build the prompt, run, collect.

The route hands a validated request here and gets back a GenerationJob (everything decided
before the engine sees anything: model → adapter handle, prompt token ids, sampling options),
then either streams the job's updates or collects them into final choices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from gateway.adapter_cache import HostAdapterCache
from gateway.adapter_loads import load_failure
from gateway.catalog import ModelCatalog, ServedModel
from gateway.engine.client import (
    EngineClient,
    EngineDead,
    EngineError,
    EngineRejected,
    GenerationUpdate,
    LoopGuard,
)
from gateway.engine.reasoning_parsing import ReasoningParsing
from gateway.engine.tool_parsing import ToolCallParsing
from gateway.errors import (
    EngineUnavailable,
    InvalidRequest,
    LoraplexError,
)
from gateway.faults import FaultInjector
from gateway.feedback_ids import ResponseIds
from gateway.limits import AdmissionLimits
from gateway.prompt_drift import PromptDrift
from gateway.request_metrics import GenerationRecorder, MetricScope
from gateway.rollout_controller import RolloutController
from gateway.schemas.openai import ChatCompletionRequest, CompletionRequest
from gateway.services.auto_tool_calls import refuse_auto_without_parser
from gateway.services.chat_outputs import plan_chat_outputs
from gateway.services.generation_job import (
    ChoiceResult,
    ChoiceResults,
    GenerationJob,
    Primed,
    fan_out_greedy,
)
from gateway.services.generation_outcome import (
    GenerationFailed,
    ended_in_error,
    record_update,
    the_versions_fault,
)
from gateway.services.prompts import PromptBuilder
from gateway.services.sampling import SamplingResolver
from gateway.shadow import ShadowMirror
from registry.service import Principal

# OpenAI's default for /v1/completions when the client leaves max_tokens out.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class GenerationService:
    def __init__(
        self,
        engine: EngineClient,
        catalog: ModelCatalog,
        tokenizer: Any,
        limiter: AdmissionLimits,
        cache: HostAdapterCache,
        controller: RolloutController | None = None,
        faults: FaultInjector | None = None,
        shadow: ShadowMirror | None = None,
        prefix_cache_per_tenant: bool = True,
        response_ids: ResponseIds | None = None,
        loop_guard: LoopGuard | None = None,
        grammar_ends_at_stop_tokens: bool = True,
        tool_parsing: ToolCallParsing | None = None,
        reasoning_parsing: ReasoningParsing | None = None,
        drift: PromptDrift | None = None,
        echo_logprobs_max_prompt_tokens: int = 8192,
    ):
        """`grammar_ends_at_stop_tokens`: the grammar backend allows a stop token only where
        the constrained text may end (vLLM's xgrammar backend; guidance does not).
        `tool_parsing`, `reasoning_parsing`: the deployment's parsers (no tool-call parser:
        tool_choice "auto" is refused; no reasoning parser: the output is all content)."""
        self._grammar_ends_at_stop_tokens = grammar_ends_at_stop_tokens
        self._tool_parsing = tool_parsing
        self._reasoning_parsing = reasoning_parsing
        self._engine, self._catalog, self._limiter, self._cache = engine, catalog, limiter, cache
        self._response_ids, self._drift = response_ids, drift
        self._prompts = PromptBuilder(tokenizer, engine)
        self._controller, self._faults, self._shadow = controller, faults, shadow
        self._sampling = SamplingResolver(
            engine,
            self._prompts,
            prefix_cache_per_tenant=prefix_cache_per_tenant,
            loop_guard=loop_guard,
            echo_logprobs_max_prompt_tokens=echo_logprobs_max_prompt_tokens,
        )

    # ---- preparing -------------------------------------------------------------------------
    # Order matters: scope (resolve for this caller) → prompt → limits. Nothing reaches the
    # engine before all three passed, and the engine only ever gets the resolved version id.
    # `note_scope` hears the resolved version at once, so that a refusal by the prompt, the
    # context length or the limits counts against the version it was for.
    async def prepare_chat(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        caller: Principal,
        caller_key: str = "",
        *,
        note_scope: Callable[[MetricScope], None] | None = None,
    ) -> GenerationJob:
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true.", param="top_logprobs")
        refuse_auto_without_parser(body, self._tool_parsing)
        served = await self._catalog.resolve(body.model, caller, caller_key)
        if note_scope is not None:
            note_scope(_scope_of(served, caller))
        role_tag = self._role_tag(served, caller)
        request_id = self._with_receipt(request_id, served, caller, role_tag)
        prompt = await self._prompts.chat(
            [m.for_template() for m in body.messages],
            body.tools_for_template(),
            body.template_switches(),
        )
        top_k = (body.top_logprobs or 0) if body.logprobs else None
        options = self._sampling.options(
            body,
            [prompt],
            body.requested_max_tokens(),
            top_k,
            caller,
            default_max_tokens=self._sampling.model_max_tokens,
            max_tokens_param=body.max_tokens_param(),
        )
        outputs = await plan_chat_outputs(
            body, prompt, options, self._tool_parsing, self._reasoning_parsing
        )
        prompts, options, copies = fan_out_greedy([prompt], outputs.options)
        job = GenerationJob(
            request_id,
            "chat.completion",
            body.model,
            served,
            prompts,
            options,
            copies=copies,
            forced_call=outputs.forced_call,
            auto_calls=outputs.auto_calls,
            call_checker=outputs.call_checker,
            reasoning=outputs.reasoning,
            role_tag=role_tag,
        )
        return await self._admit(job, caller, caller_key)

    async def prepare_completion(
        self,
        body: CompletionRequest,
        request_id: str,
        caller: Principal,
        caller_key: str = "",
        *,
        note_scope: Callable[[MetricScope], None] | None = None,
    ) -> GenerationJob:
        if body.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        served = await self._catalog.resolve(body.model, caller, caller_key)
        if note_scope is not None:
            note_scope(_scope_of(served, caller))
        role_tag = self._role_tag(served, caller)
        request_id = self._with_receipt(request_id, served, caller, role_tag)
        prompts = await self._prompts.completion(body.prompt)
        options = self._sampling.options(
            body,
            prompts,
            body.max_tokens,
            body.logprobs,
            caller,
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
        )
        echo = self._prompts.echo_texts(body.prompt, prompts) if body.echo else None
        prompts, options, copies = fan_out_greedy(prompts, options)
        if echo is not None:
            echo = [text for text in echo for _ in range(copies)]
        job = GenerationJob(
            request_id,
            "text_completion",
            body.model,
            served,
            prompts,
            options,
            echo_texts=echo,
            copies=copies,
            role_tag=role_tag,
        )
        return await self._admit(job, caller, caller_key)

    def _with_receipt(
        self, request_id: str, served: ServedModel, caller: Principal, role_tag: int
    ) -> str:
        """The response id, signed with the version that serves it (for POST /v1/feedback)."""
        if self._response_ids is None:
            return request_id
        return self._response_ids.sign(
            request_id,
            version_id=served.adapter.engine_id if served.adapter is not None else None,
            judged=served.judged_by(caller.tenant),
            tenant_id=caller.tenant_id,
            now=time.time(),
            role_tag=role_tag,
        )

    def _role_tag(self, served: ServedModel, caller: Principal) -> int:
        """The rollout role `served` is in for a request that judges it; 0 for one that does
        not (RolloutController.role_tag)."""
        if not served.judged_by(caller.tenant) or self._controller is None:
            return 0
        return self._controller.role_tag(served.adapter_name, served.version)

    async def _admit(self, job: GenerationJob, caller: Principal, caller_key: str) -> GenerationJob:
        sequences = len(job.prompts) * job.options.n
        job.lease = await self._limiter.acquire(
            caller.tenant,
            caller.policy,
            prompt_tokens=job.prompt_tokens,
            max_tokens=job.options.max_tokens * sequences,
            sequences=sequences,
        )
        served = job.served
        # Recorder and controller first: a version whose adapter fails to load is a failed
        # request of that version, which its rollout window must see (a canary that could not
        # load answered every caller 500 and was never rolled back).
        job.recorder = GenerationRecorder(
            _scope_of(served, caller),
            job.prompt_tokens,
            sequences,
            streamed=job.options.stream,
        )
        job.controller = self._controller
        if served.adapter is not None:
            try:
                job.adapter_load = await self._cache.acquire(
                    served.adapter, (served.adapter_name, served.version_label)
                )
            except BaseException as exc:
                job.recorder.failed = the_versions_fault(exc)
                job.ran = False  # refunded: the engine produced nothing
                job.finish()
                raise
            job.cache = self._cache
        if self._shadow is not None:
            job.shadow = self._shadow.plan(job, caller, caller_key)
        if self._drift is not None:
            job.options = self._drift.plan(job.served, job.prompts, job.options, job.copies)
        return job

    # ---- running ---------------------------------------------------------------------------
    async def stream(self, job: GenerationJob) -> AsyncGenerator[tuple[int, GenerationUpdate]]:
        """(prompt index, update) pairs as the engine produces them, all prompts interleaved.
        However it ends, the job's lease and metrics are closed."""
        recorder = job.recorder
        received = False
        try:
            if self._faults is not None:
                await self._faults.apply(job.served.adapter_name, job.served.version)
            async with aclosing(self._interleaved(job)) as updates:
                async for index, update in updates:
                    received = True
                    if update.cached_prompt_tokens is not None:
                        job.cached_by_prompt[index] = update.cached_prompt_tokens
                    if recorder is not None:
                        record_update(recorder, job, update, self._grammar_ends_at_stop_tokens)
                    if job.shadow is not None:
                        job.shadow.observe(index, update)
                    if update.prompt_surprisal is not None and self._drift is not None:
                        self._drift.observe(job.served, update)
                    yield index, update
            if recorder is not None:
                recorder.completed = True
            if job.shadow is not None and self._shadow is not None:
                # The client's answer is complete (only bytes left to send); the mirror runs
                # in its own task, so it can neither delay nor fail this request.
                self._shadow.submit(job.shadow)
        except Exception as exc:
            if recorder is not None:
                recorder.failed = the_versions_fault(exc)
                recorder.error_status = exc.status_code if isinstance(exc, LoraplexError) else 500
            if not received:  # the client got none of its output
                job.ran = False
            raise
        finally:
            job.finish()

    async def _interleaved(
        self, job: GenerationJob
    ) -> AsyncGenerator[tuple[int, GenerationUpdate]]:
        if len(job.prompts) == 1:
            async with aclosing(self._engine_stream(job, 0)) as updates:
                async for update in updates:
                    yield 0, update
            return
        queue: asyncio.Queue[tuple[int, GenerationUpdate | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with aclosing(self._engine_stream(job, index)) as updates:
                    async for update in updates:
                        await queue.put((index, update))
                await queue.put((index, None))
            except Exception as exc:
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(job.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def open_stream(self, job: GenerationJob) -> Primed:
        """Start the job and wait for its first update before the response starts.

        Failures before any output (rejected options, dead engine) then raise here and get a
        proper HTTP status, instead of surfacing inside a stream already answered with 200.
        """
        updates = self.stream(job)
        try:
            first = await anext(updates)
        except StopAsyncIteration:
            return Primed(None, updates)
        except BaseException:
            await updates.aclose()
            raise
        return Primed(first, updates)

    async def _engine_stream(
        self, job: GenerationJob, prompt_index: int
    ) -> AsyncGenerator[GenerationUpdate]:
        request_id = job.sub_request_id(prompt_index)
        finished = False
        generation = self._engine.generate(
            request_id, job.prompts[prompt_index], job.options, job.served.adapter
        )
        try:
            async with aclosing(generation):
                async for update in generation:
                    finished = update.finished
                    if any(choice.finish_reason == "error" for choice in update.choices):
                        # Refused with its adapter's load: the load's failure is the answer.
                        raise await load_failure(job.adapter_load) or ended_in_error(job)
                    yield update
        except EngineDead as exc:
            raise EngineUnavailable("The inference engine is unavailable.") from exc
        except EngineRejected as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        except EngineError as exc:
            raise GenerationFailed("The engine failed to generate a response.") from exc
        finally:
            # Client gone or error: make sure the engine stops spending compute on it.
            if not finished:
                await asyncio.shield(self._engine.abort(request_id))

    async def collect(self, job: GenerationJob) -> list[ChoiceResult]:
        results = ChoiceResults(job, self._prompts.echo_logprobs)
        async with aclosing(self.stream(job)) as updates:
            async for prompt_index, update in updates:
                results.add(prompt_index, update)
        return results.in_order()


def _scope_of(served: ServedModel, caller: Principal) -> MetricScope:
    """Who asked for what, as the request metrics label it."""
    return MetricScope(caller.tenant, served.adapter_name, served.version_label)
