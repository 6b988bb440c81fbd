"""Prompt drift per adapter version (seed §8: perplexity drift over 24 h, at most 1.5 times
the dev set's).

A sampled share of each adapter version's requests (LORAPLEX_DRIFT_SAMPLE_RATE, prompts of at
most LORAPLEX_DRIFT_MAX_PROMPT_TOKENS) asks the engine for its prompt's token logprobs under
that adapter, on the request itself: no second request, no prompt kept, only sums. The
version's prompt perplexity over the last 24 hours (exp of the mean negative logprob per token)
is compared with its reference: the card's `drift.dev_perplexity` (the dev set's, measured on
the same base and adapter), else the version's first LORAPLEX_DRIFT_REFERENCE_SAMPLES sampled
prompts on this replica (its launch traffic). Above the card's `drift.max_ratio` (1.5 by
default) the traffic no longer looks like what the adapter was made and checked for: the
`LoraplexPromptDrift` alert. A sampled request reads no prefix cache (vLLM computes every
prompt position), which is what the sample rate and the prompt cap bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import Gauge

from gateway.catalog import ServedModel
from gateway.engine.client import EngineClient, GenerationUpdate, SamplingOptions
from gateway.metrics import PROMPT_DRIFT_LIMIT, PROMPT_DRIFT_RATIO, PROMPT_PERPLEXITY
from gateway.registry_runtime import RegistryRuntime
from registry import service

logger = logging.getLogger(__name__)
WINDOW_S = 24 * 3600.0
BUCKET_S = 3600.0  # the window slides by the hour
MIN_WINDOW_SAMPLES = 100  # fewer prompts than this in 24 h: no ratio (too noisy to alert on)
DEFAULT_MAX_RATIO = 1.5
MAX_VERSIONS = 10_000  # versions tracked by one replica; the least recently sampled go first

CardOf = Callable[[str, int], Awaitable[Mapping[str, Any] | None]]


@dataclass
class _Version:
    reference: float | None = None  # perplexity; None until known
    from_card: bool = False
    max_ratio: float = DEFAULT_MAX_RATIO
    launch_sum: float = 0.0  # while the reference is the launch traffic, being measured
    launch_tokens: int = 0
    launch_samples: int = 0
    # (hour, sum of -logprob, tokens, prompts), oldest first
    buckets: deque[tuple[int, float, int, int]] = field(default_factory=deque)
    card_task: asyncio.Task[None] | None = None


class PromptDrift:
    def __init__(
        self,
        *,
        sample_rate: float,
        max_prompt_tokens: int,
        reference_samples: int,
        card_of: CardOf | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ):
        """`card_of(adapter, version)`: the version's stored card (its `drift` section sets the
        reference), fetched once per version."""
        self._rate = sample_rate
        self._max_prompt_tokens = max_prompt_tokens
        self._reference_samples = reference_samples
        self._card_of = card_of
        self._clock = clock
        self._rng = rng or random.Random()
        self._versions: dict[tuple[str, int], _Version] = {}

    def plan(
        self, served: ServedModel, prompts: list[list[int]], options: SamplingOptions, copies: int
    ) -> SamplingOptions:
        """`options`, asking for prompt logprobs when this request is sampled. Not with n > 1
        or a greedy n fanned out into `copies`: vLLM would score the one prompt once per
        sequence, each without the prefix cache the copies are there to share. Not an echo with
        logprobs: an eval harness scoring answers (`loraplex eval perplexity`, lm-evaluation-
        harness) is no traffic the adapter serves."""
        sampled = (
            served.adapter is not None
            and served.version is not None
            and self._rate > 0
            and options.n == 1
            and copies == 1
            and options.echo_logprobs is None
            and 0 < max(len(prompt) for prompt in prompts) <= self._max_prompt_tokens
            and self._rng.random() < self._rate
        )
        return replace(options, prompt_logprobs=True) if sampled else options

    async def warm_up(self, engine: EngineClient) -> None:
        """One prompt-logprobs request before the gateway is ready: vLLM compiles the ranking
        its logprobs take (torch.compile) on first use, which held every request in flight for
        ~3 s on this machine when the first sampled request came in the middle of traffic."""
        if self._rate <= 0:
            return
        options = SamplingOptions(max_tokens=1, stream=False, prompt_logprobs=True)
        try:
            async for _ in engine.generate("loraplex-drift-warm-up", [0, 1], options, None):
                pass
        except Exception:  # drift is a monitor: it never stops the gateway from starting
            logger.warning("drift: prompt-logprobs warm-up failed", exc_info=True)

    def observe(self, served: ServedModel, update: GenerationUpdate) -> None:
        if update.prompt_surprisal is not None:
            self.record(served, *update.prompt_surprisal)

    def record(self, served: ServedModel, surprisal: float, tokens: int) -> None:
        """One sampled prompt: the sum of its tokens' negative logprobs, and their count."""
        if served.version is None or tokens <= 0 or not math.isfinite(surprisal):
            return
        key = (served.adapter_name, served.version)
        state = self._versions.pop(key, None) or self._track(key)
        self._versions[key] = state  # most recently sampled last
        hour = int(self._clock() // BUCKET_S)
        if state.buckets and state.buckets[-1][0] == hour:
            _, total, count, prompts = state.buckets[-1]
            state.buckets[-1] = (hour, total + surprisal, count + tokens, prompts + 1)
        else:
            state.buckets.append((hour, surprisal, tokens, 1))
        _expire(state, hour)
        if state.reference is None and state.launch_samples < self._reference_samples:
            state.launch_sum += surprisal
            state.launch_tokens += tokens
            state.launch_samples += 1
            if state.launch_samples == self._reference_samples:
                state.reference = math.exp(state.launch_sum / state.launch_tokens)
        self._export(key, state)
        self._prune(hour)

    def perplexity(self, adapter: str, version: int) -> tuple[float | None, float | None, int]:
        """(last 24 h, reference, prompts in the last 24 h) for a version this replica saw."""
        state = self._versions.get((adapter, version))
        if state is None:
            return None, None, 0
        total = sum(b[1] for b in state.buckets)
        tokens = sum(b[2] for b in state.buckets)
        prompts = sum(b[3] for b in state.buckets)
        current = math.exp(total / tokens) if tokens else None
        return current, state.reference, prompts

    def _track(self, key: tuple[str, int]) -> _Version:
        while len(self._versions) >= MAX_VERSIONS:
            oldest = next(iter(self._versions))
            self._forget(oldest)
        state = _Version()
        if self._card_of is not None:
            state.card_task = asyncio.get_running_loop().create_task(self._read_card(key, state))
        return state

    async def _read_card(self, key: tuple[str, int], state: _Version) -> None:
        assert self._card_of is not None
        try:
            card = await self._card_of(*key)
        except Exception:  # the registry is out: launch traffic stands in for the dev set
            logger.warning("drift: card of %s@%s unreadable; using launch traffic", *key)
            return
        drift = (card or {}).get("drift") or {}
        if drift.get("max_ratio") is not None:
            state.max_ratio = float(drift["max_ratio"])
        if drift.get("dev_perplexity") is not None:
            state.reference = float(drift["dev_perplexity"])
            state.from_card = True
        if self._versions.get(key) is state:
            self._export(key, state)

    def _export(self, key: tuple[str, int], state: _Version) -> None:
        adapter, version = key[0], str(key[1])
        current, reference, prompts = self.perplexity(*key)
        if current is not None:
            _set(PROMPT_PERPLEXITY, current, adapter, version, "24h")
        if reference is not None:
            _set(PROMPT_PERPLEXITY, reference, adapter, version, "reference")
        _set(PROMPT_DRIFT_LIMIT, state.max_ratio, adapter, version)
        if current is not None and reference is not None and prompts >= MIN_WINDOW_SAMPLES:
            _set(PROMPT_DRIFT_RATIO, current / reference, adapter, version)
        else:  # too few prompts left in the window: an old ratio must not stand for them
            _drop(PROMPT_DRIFT_RATIO, adapter, version)
        if current is None:
            _drop(PROMPT_PERPLEXITY, adapter, version, "24h")

    def refresh(self) -> None:
        """Slide every version's window to now (at scrape time): a replica that stopped
        sampling must not keep exporting the figures of its last samples."""
        hour = int(self._clock() // BUCKET_S)
        self._prune(hour)
        for key, state in list(self._versions.items()):
            _expire(state, hour)
            self._export(key, state)

    def _prune(self, hour: int) -> None:
        """Versions not sampled for a whole window lose their series (a retired version's
        last ratio must not alert forever); least recently sampled first."""
        while self._versions:
            key, state = next(iter(self._versions.items()))
            if state.buckets and state.buckets[-1][0] > hour - WINDOW_S // BUCKET_S:
                return
            self._forget(key)

    def _forget(self, key: tuple[str, int]) -> None:
        state = self._versions.pop(key)
        if state.card_task is not None:
            state.card_task.cancel()
        adapter, version = key[0], str(key[1])
        _drop(PROMPT_PERPLEXITY, adapter, version, "24h")
        _drop(PROMPT_PERPLEXITY, adapter, version, "reference")
        _drop(PROMPT_DRIFT_LIMIT, adapter, version)
        _drop(PROMPT_DRIFT_RATIO, adapter, version)


def _expire(state: _Version, hour: int) -> None:
    while state.buckets and state.buckets[0][0] <= hour - WINDOW_S // BUCKET_S:
        state.buckets.popleft()


# The series this process has set (gauge, labels): only those are removed (setting one that
# never existed to 0 would create it, and under PROMETHEUS_MULTIPROC_DIR leave it exported).
_LIVE: set[tuple[int, tuple[str, ...]]] = set()


def _set(gauge: Gauge, value: float, *labels: str) -> None:
    gauge.labels(*labels).set(value)
    _LIVE.add((id(gauge), labels))


def _drop(gauge: Gauge, *labels: str) -> None:
    """Remove a series if it exists. Set to 0 first: under PROMETHEUS_MULTIPROC_DIR the value
    lives in a file that remove() leaves behind (as gateway/rollout_router.py does)."""
    if (id(gauge), labels) not in _LIVE:  # never set: nothing to export or remove
        return
    _LIVE.discard((id(gauge), labels))
    gauge.labels(*labels).set(0)
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def registry_cards(registry: RegistryRuntime) -> CardOf:
    """`card_of` reading a version's stored card from the registry."""

    async def card_of(adapter: str, version: int) -> Mapping[str, Any] | None:
        async with registry.sessions() as session:
            row = await service.get_version(session, name=adapter, version=version)
            return row.card

    return card_of
