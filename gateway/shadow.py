"""Shadow mode (seed step 8): a copy of a stable's request goes to the candidate version, whose
output is compared with the stable's and then discarded; users never see it.

When: the request named the adapter (not `name@N`), the stable served it (not the canary, not a
fallback target), the caller is in the shadow's share (`RolloutView.shadow_route`, sticky), and
the stable's generation completed. A failed or abandoned request is not mirrored: there is
nothing to compare with.

How: the same prompts, sampling options and tenant scope (the candidate resolves as
`name@N` for the caller's tenant, exactly like the stable did), one choice per prompt, in a
background task started once the client's answer is complete, so the mirror never delays or
fails it. The mirror is not charged to the tenant's limits (the tenant did not ask for it) and
is absent from the per-request metrics; at most `max_inflight` mirrors per shadowed adapter
run at once and any more are dropped (counted), so a burst cannot double the engine's load,
and one tenant's long requests on its shadow never starve another adapter's shadow of
evidence (one shared cap did).

What it records per candidate version: outcome (match, diverged, error, dropped), the
divergence of the generated tokens, TTFT and end-to-end latency (gateway/metrics.py), and one
sample in the rollback monitor's shadow window for the version (recorded, never judged: a
shadow serves nobody, so there is nothing to roll back; kept apart from the window of the
version's own traffic, which a mirror that finishes after its canary started must not reach),
shown by `GET /admin/v1/rollouts/{name}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gateway.adapter_cache import HostAdapterCache
from gateway.adapter_loads import AdapterCapacityFull, load_failure
from gateway.catalog import ModelCatalog
from gateway.engine.client import (
    AdapterHandle,
    EngineClient,
    EngineError,
    GenerationUpdate,
    SamplingOptions,
)
from gateway.faults import FaultInjector
from gateway.metrics import (
    SHADOW_DIVERGENCE,
    SHADOW_DURATION,
    SHADOW_REQUESTS,
    SHADOW_TIME_TO_FIRST_TOKEN,
)
from gateway.rollback_monitor import Sample
from gateway.rollout_controller import RolloutController
from gateway.rollout_router import RolloutRouter
from registry.service import Principal

if TYPE_CHECKING:
    from gateway.services.generation_job import GenerationJob

logger = logging.getLogger(__name__)


def divergence(stable: list[int], candidate: list[int]) -> float:
    """1 - (common prefix length) / (longer length): 0 for identical outputs, 1 when they
    differ from the first token. A prefix, not a set overlap: after the first different token
    the two generations condition on different text, so later agreement is coincidence."""
    longer = max(len(stable), len(candidate))
    if longer == 0:
        return 0.0
    common = 0
    for mine, theirs in zip(stable, candidate, strict=False):
        if mine != theirs:
            break
        common += 1
    return 1.0 - common / longer


@dataclass
class ShadowPlan:
    """One request to mirror, decided before the stable runs; the stable's tokens are
    collected while it streams."""

    adapter: str
    version: int
    caller: Principal
    prompts: list[list[int]]  # the request's distinct prompts
    options: SamplingOptions
    copies: int  # the stable job's greedy fan-out (each prompt `copies` times, n=1)
    stable_tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stable_tokens = [[] for _ in self.prompts]

    @property
    def address(self) -> str:
        return f"{self.adapter}@{self.version}"

    def observe(self, prompt_index: int, update: GenerationUpdate) -> None:
        """Keep the stable's first choice of each distinct prompt (what the candidate's one
        choice is compared with)."""
        if prompt_index % self.copies:
            return  # a fanned-out copy: choice 1.. of the same prompt
        tokens = self.stable_tokens[prompt_index // self.copies]
        for delta in update.choices:
            if delta.index == 0:
                tokens.extend(delta.token_ids)


class ShadowMirror:
    def __init__(
        self,
        engine: EngineClient,
        catalog: ModelCatalog,
        router: RolloutRouter,
        cache: HostAdapterCache,
        controller: RolloutController | None = None,
        faults: FaultInjector | None = None,
        *,
        max_inflight: int = 4,
    ):
        self._engine = engine
        self._catalog = catalog
        self._router = router
        self._cache = cache
        self._controller = controller
        self._faults = faults
        self._max_inflight = max_inflight
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, int] = {}  # shadowed adapter → its mirrors in flight

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    def plan(self, job: GenerationJob, caller: Principal, caller_key: str) -> ShadowPlan | None:
        """The mirror of `job`, or None when this request is not to be mirrored."""
        view = self._router.view(job.model)  # None for `name@N`: pinned requests are not
        if view is None:
            return None
        route = view.shadow_route(caller_key)
        served = job.served
        if (
            route is None
            or route.version is None
            or served.adapter_name != view.name
            or served.version != view.stable_version
        ):
            return None  # not the caller's share, or not the stable that served it
        return ShadowPlan(
            adapter=view.name,
            version=route.version,
            caller=caller,
            prompts=job.prompts[:: job.copies],
            # Streamed, to time the candidate's first token; no logprobs (nor an echo's prompt
            # logprobs, which would also skip the prefix cache): nothing reads them.
            options=replace(job.options, n=1, logprobs=None, echo_logprobs=None, stream=True),
            copies=job.copies,
        )

    def submit(self, plan: ShadowPlan) -> None:
        """Start the mirror in the background, or drop it when `max_inflight` mirrors of the
        same adapter already run."""
        running = self._running.get(plan.adapter, 0)
        if running >= self._max_inflight:
            SHADOW_REQUESTS.labels(plan.adapter, str(plan.version), "dropped").inc()
            return
        self._running[plan.adapter] = running + 1
        task = asyncio.ensure_future(self._mirror(plan))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(done, plan.adapter))

    def _finished(self, task: asyncio.Task[None], adapter: str) -> None:
        self._tasks.discard(task)
        left = self._running.pop(adapter) - 1
        if left:
            self._running[adapter] = left

    async def _mirror(self, plan: ShadowPlan) -> None:
        started = time.perf_counter()
        first: list[float] = []  # the earliest first token over the prompts
        outputs: list[list[int]] | None = None
        try:
            outputs = await self._generate(plan, first)
        except asyncio.CancelledError:
            raise  # shutting down: no verdict on a request that was not allowed to finish
        except AdapterCapacityFull:
            # Every adapter slot in use: the engine's state, not the candidate's failure.
            SHADOW_REQUESTS.labels(plan.adapter, str(plan.version), "dropped").inc()
            return
        except Exception as exc:
            # The candidate's failure is a finding, not an incident: counted, never raised.
            logger.warning("shadow request to %s failed: %s", plan.address, type(exc).__name__)
        finished = time.perf_counter()
        labels = (plan.adapter, str(plan.version))
        ttft = min(first) - started if first else None
        if outputs is None:
            SHADOW_REQUESTS.labels(*labels, "error").inc()
        else:
            ratios = [divergence(s, c) for s, c in zip(plan.stable_tokens, outputs, strict=True)]
            same = all(s == c for s, c in zip(plan.stable_tokens, outputs, strict=True))
            SHADOW_REQUESTS.labels(*labels, "match" if same else "diverged").inc()
            SHADOW_DIVERGENCE.labels(*labels).observe(sum(ratios) / len(ratios))
            SHADOW_DURATION.labels(*labels).observe(finished - started)
        if ttft is not None:
            SHADOW_TIME_TO_FIRST_TOKEN.labels(*labels).observe(ttft)
        if self._controller is not None:
            sample = Sample(ttft, finished - started, outputs is None)
            self._controller.record_shadow(plan.adapter, plan.version, sample)

    async def _generate(self, plan: ShadowPlan, first: list[float]) -> list[list[int]]:
        # The caller's scope, as for the stable: a tenant that lost access mirrors nothing.
        served = await self._catalog.resolve(plan.address, plan.caller)
        adapter = served.adapter
        if adapter is None or served.version != plan.version:
            raise LookupError(f"{plan.address} did not resolve to itself")
        load = await self._cache.acquire(adapter, (served.adapter_name, served.version_label))
        try:
            if self._faults is not None:
                await self._faults.apply(served.adapter_name, served.version)
            runs = (self._one(plan, i, adapter, first, load) for i in range(len(plan.prompts)))
            return list(await asyncio.gather(*runs))
        finally:
            self._cache.release(adapter)

    async def _one(
        self,
        plan: ShadowPlan,
        index: int,
        adapter: AdapterHandle,
        first: list[float],
        load: asyncio.Task[None] | None,
    ) -> list[int]:
        request_id = f"shadow-{uuid.uuid4().hex}-{index}"
        tokens: list[int] = []
        finished = False
        try:
            async for update in self._engine.generate(
                request_id, plan.prompts[index], plan.options, adapter
            ):
                finished = update.finished
                if any(delta.finish_reason == "error" for delta in update.choices):
                    # vLLM failed it (with its adapter's load, or later): no output to judge.
                    raise await load_failure(load) or EngineError("the engine failed it")
                for delta in update.choices:
                    if delta.token_ids and not tokens:
                        first.append(time.perf_counter())
                    tokens.extend(delta.token_ids)
        finally:
            if not finished:  # failed or cancelled: free the engine's slot
                await asyncio.shield(self._engine.abort(request_id))
        return tokens

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
