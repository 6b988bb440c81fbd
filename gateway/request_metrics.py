"""Per-request metrics for /v1: who (tenant), what (adapter, version), how it went.

Two halves, because no single place sees everything:
- `RequestMetricsMiddleware` (pure ASGI) sees every /v1 request end to end, whatever ends it
  (401, 404, 429, a 5xx, a finished stream): it counts requests by status and times the
  generations by outcome: ok, client_closed (the client gave up: 499, timed up to then, a lower
  bound of what it would have waited) or error, so that requests every client abandons still
  show in the latency the alerts watch. A refusal (4xx) did no work and is not timed.
- `GenerationRecorder` lives on a generation job and sees tokens: TTFT, time per output token,
  token counts, queued and in-flight gauges. A non-streamed request gets its tokens all at
  once at the end: its TTFT is the engine's own first-token time (vLLM reports it), and an
  engine that does not report one leaves it out of TTFT, time per output token and the
  rollout monitor's TTFT window rather than record its whole latency as TTFT. Time per output
  token is per sequence: the sequences of a request with several prompts or n > 1 decode side
  by side, so its wall time is divided by one sequence's tokens.
Routes leave the caller's scope in `request.state.metric_scope`; before auth it is unknown (""),
and it names the adapter version as soon as the model resolves (a 429 or 400 after that counts
against that version, not the base model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http_utils import route_path
from gateway.metrics import (
    COMPLETION_TOKENS,
    CONSTRAINED_OUTPUTS,
    LOOP_STOPS,
    PROMPT_TOKENS,
    REQUEST_DURATION,
    REQUESTS,
    REQUESTS_IN_FLIGHT,
    REQUESTS_QUEUED,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOOL_CALLS,
)

# Path → route label; anything else under /v1 is "other" (bounded label values).
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/v1/feedback": "feedback",
}
GENERATION_ROUTES = frozenset({"chat", "completions"})
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class MetricScope:
    tenant: str = ""
    adapter: str = ""
    version: str = ""


@dataclass
class GenerationRecorder:
    scope: MetricScope
    prompt_tokens: int
    sequences: int = 1  # prompts x n: generated side by side, each its own token stream
    # False: the engine hands over the output at the end (stream=false), so the first token's
    # time is known only from the engine's own stats, if at all.
    streamed: bool = True
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # None: no token yet, or its time is unknown
    output_started: bool = False
    completion_tokens: int = 0
    finished: bool = False
    completed: bool = False  # the engine finished every sequence (not aborted, not failed)
    failed: bool = False  # an error ended it after the response had started
    # The status of the error that ended it after the response had started (a constraint
    # allowing no token: 400; a chunk the gateway could not shape: 500): recorded with it, not
    # as a client that left. Whether it is the version's fault is `failed`.
    error_status: int | None = None
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        REQUESTS_IN_FLIGHT.labels(self.scope.tenant, self.scope.adapter).inc()
        REQUESTS_QUEUED.labels(self.scope.tenant, self.scope.adapter).inc()

    def tokens(self, count: int, *, produced_at: float | None = None, timed: bool = True) -> None:
        """`count` new tokens, which arrived now. The first ones time TTFT: at `produced_at`
        (perf_counter) when the engine says when it made them, else now when they arrive as
        they are made (`timed`), else not at all."""
        if count <= 0:
            return
        if not self.output_started:
            self.output_started = True
            REQUESTS_QUEUED.labels(self.scope.tenant, self.scope.adapter).dec()
            if produced_at is not None or timed:
                made = time.perf_counter() if produced_at is None else produced_at
                # An engine time converted between clocks may land a hair before admission.
                self.first_token_at = max(made, self.started)
                TIME_TO_FIRST_TOKEN.labels(*self._labels()).observe(
                    self.first_token_at - self.started
                )
        self.completion_tokens += count

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.finished_at = time.perf_counter()
        tenant, adapter = self.scope.tenant, self.scope.adapter
        REQUESTS_IN_FLIGHT.labels(tenant, adapter).dec()
        if not self.output_started:
            REQUESTS_QUEUED.labels(tenant, adapter).dec()
        PROMPT_TOKENS.labels(*self._labels()).inc(self.prompt_tokens)
        COMPLETION_TOKENS.labels(*self._labels()).inc(self.completion_tokens)
        # The sequences decode side by side: each of them took the time between its tokens,
        # so the wall time is divided by one (mean) sequence's tokens, not by all of theirs.
        per_sequence = self.completion_tokens / max(1, self.sequences)
        if self.first_token_at is not None and per_sequence > 1:
            per_token = (self.finished_at - self.first_token_at) / (per_sequence - 1)
            TIME_PER_OUTPUT_TOKEN.labels(*self._labels()).observe(per_token)

    def constrained_end(self, kind: str, ended: str) -> None:
        """One sequence under a structured-output constraint ended so (CONSTRAINED_OUTPUTS)."""
        CONSTRAINED_OUTPUTS.labels(*self._labels(), kind, ended).inc()

    def tool_call(self, outcome: str) -> None:
        """One call the model wrote under tool_choice auto, judged (TOOL_CALLS)."""
        TOOL_CALLS.labels(*self._labels(), outcome).inc()

    def loop_stopped(self) -> None:
        """The loop guard ended one of this request's sequences."""
        LOOP_STOPS.labels(*self._labels()).inc()

    def _labels(self) -> tuple[str, str, str]:
        return self.scope.tenant, self.scope.adapter, self.scope.version


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Below the root path, as the router matches it: behind a proxy's prefix (uvicorn
        # --root-path) the raw path never started with /v1/ and nothing was counted.
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        route = ROUTES.get(path, "models" if path.startswith("/v1/models/") else "other")
        started = time.perf_counter()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            state = scope.get("state", {})
            recorder: GenerationRecorder | None = state.get("generation")
            if recorder is not None and status == 200 and not recorder.completed:
                # A stream that started with 200 and ended early: failed, or the client left.
                status = recorder.error_status or (500 if recorder.failed else CLIENT_CLOSED)
            labels: MetricScope = state.get("metric_scope") or MetricScope()
            REQUESTS.labels(labels.tenant, labels.adapter, labels.version, route, str(status)).inc()
            outcome = duration_outcome(status)
            if route in GENERATION_ROUTES and outcome is not None:
                REQUEST_DURATION.labels(
                    labels.tenant, labels.adapter, labels.version, route, outcome
                ).observe(time.perf_counter() - started)


def duration_outcome(status: int) -> str | None:
    """The `outcome` a generation's duration is recorded under; None: a refusal, not timed."""
    if status == CLIENT_CLOSED:
        return "client_closed"
    if status >= 500:
        return "error"
    return "ok" if status < 400 else None


def note_caller(state: object, tenant: str) -> None:
    """Label the request with its tenant as soon as it is authenticated (a later 404 or 429
    still counts against the right tenant)."""
    state.metric_scope = MetricScope(tenant)  # type: ignore[attr-defined]


def note_scope(state: object, scope: MetricScope) -> None:
    """Label the request with the adapter version its model resolved to, before the limits,
    the prompt and the engine may still refuse it."""
    state.metric_scope = scope  # type: ignore[attr-defined]


def note_generation(state: object, recorder: GenerationRecorder | None) -> None:
    if recorder is not None:
        state.metric_scope = recorder.scope  # type: ignore[attr-defined]
        state.generation = recorder  # type: ignore[attr-defined]
