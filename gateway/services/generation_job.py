"""One admitted generation request and its results: what the engine will run, and what it holds
while running (the tenant's limits lease, the adapter pin, its metrics and monitor hook)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.adapter_cache import HostAdapterCache
from gateway.catalog import ServedModel
from gateway.engine.client import SamplingOptions, TokenLogprob
from gateway.limits import Lease
from gateway.request_metrics import GenerationRecorder
from gateway.rollout_controller import RolloutController
from gateway.shadow import ShadowPlan


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
    # Set by admission: the tenant's limits lease, this request's metrics, the adapter pin.
    lease: Lease | None = None
    recorder: GenerationRecorder | None = None
    cache: HostAdapterCache | None = None
    controller: RolloutController | None = None
    shadow: ShadowPlan | None = None  # a copy for the adapter's shadow, sent once complete
    # Prompt index → prompt tokens the engine served from its prefix cache, as reported.
    cached_by_prompt: dict[int, int] = field(default_factory=dict)

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
                    self.served.adapter_name, self.served.version, self.recorder
                )
        if self.lease is not None:
            self.lease.release(completion)
        if self.cache is not None and self.served.adapter is not None:
            self.cache.release(self.served.adapter)
            self.cache = None  # released once

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
