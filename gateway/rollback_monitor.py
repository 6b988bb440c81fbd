"""Per served version: a sliding window of the last N requests (default 100, the seed's) and the
decision whether that version is breaching its thresholds.

Pure state, no I/O and no clock reads of its own: the generation path feeds it one observation
per finished request, the rollout controller asks it for verdicts and acts on them (registry
write, audit, metrics). Kept apart so the decision rules are unit-tested exhaustively and the
same code judges canaries, stable versions and shadow candidates.

Rules (seed §rollback triggers):
- p95 TTFT or p95 end-to-end latency above the SLA by more than `margin_ms`, or above an
  absolute bound;
- error rate (engine errors and 5xx) above `max_error_rate` (0.1 %) over the window.
A client that hung up counts only once it waited past a latency bound (`hang_up_sample`).
A verdict needs a full window, so one slow request never rolls anything back; after a verdict
the version's window starts empty, so the next verdict needs a whole new window of evidence
(no flapping on the same data).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypedDict


@dataclass(frozen=True)
class WindowLimits:
    window: int = 100
    max_error_rate: float = 0.001
    sla_p95_ttft_ms: float | None = None
    sla_p95_e2e_ms: float | None = None
    margin_ms: float = 15.0
    max_p95_ttft_ms: float | None = None  # absolute bounds, SLA or not
    max_p95_e2e_ms: float | None = None
    # Judged on callers' feedback (gateway.outcome_monitor), not on this window's requests.
    min_task_success: float | None = 0.9
    # Judged on the tool calls the version wrote (gateway.outcome_monitor), likewise.
    min_tool_call_validity: float | None = 0.95

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1 request")
        if not 0 <= self.max_error_rate < 1:
            raise ValueError("max_error_rate must be in [0, 1)")
        if self.min_task_success is not None and not 0 <= self.min_task_success <= 1:
            raise ValueError("min_task_success must be in [0, 1]")
        if self.min_tool_call_validity is not None and not 0 <= self.min_tool_call_validity <= 1:
            raise ValueError("min_tool_call_validity must be in [0, 1]")

    @property
    def ttft_bound_ms(self) -> float | None:
        """The lowest TTFT a p95 may not exceed (SLA + margin, or the absolute bound)."""
        return _lowest(self.sla_p95_ttft_ms, self.max_p95_ttft_ms, self.margin_ms)

    @property
    def e2e_bound_ms(self) -> float | None:
        """The lowest end-to-end latency a p95 may not exceed."""
        return _lowest(self.sla_p95_e2e_ms, self.max_p95_e2e_ms, self.margin_ms)


def _lowest(sla: float | None, bound: float | None, margin: float) -> float | None:
    limits = [x for x in (None if sla is None else sla + margin, bound) if x is not None]
    return min(limits) if limits else None


@dataclass(frozen=True)
class WindowFigures:
    samples: int
    p95_ttft_ms: float | None
    p95_e2e_ms: float | None
    error_rate: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "samples": self.samples,
            "p95_ttft_ms": self.p95_ttft_ms,
            "p95_e2e_ms": self.p95_e2e_ms,
            "error_rate": self.error_rate,
        }


class Figures(Protocol):
    """What a verdict was reached on, as the rollback's registry event records it."""

    def as_dict(self) -> Mapping[str, float | int | str | None]: ...


@dataclass(frozen=True)
class Verdict:
    # "error_rate" | "ttft_p95" | "latency_p95" | "task_success" | "tool_calls" |
    # "safety_incident": bounded
    # metric label values
    reason: str
    figures: Figures
    detail: str
    # Never dropped while its version keeps the role it was judged in: retried after a refused
    # fallback or a failing call, as a safety incident is reported once, not once a window.
    persistent: bool = False


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile (no interpolation: with 100 samples it is the 95th)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class SampleFields(TypedDict):
    ttft_s: float | None
    e2e_s: float
    error: bool


@dataclass(frozen=True)
class Sample:
    """One finished request as the monitor sees it."""

    ttft_s: float | None  # None: no token came
    e2e_s: float
    error: bool

    def fields(self) -> SampleFields:
        return {"ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "error": self.error}


def hang_up_sample(
    ttft_s: float | None, elapsed_s: float, limits: WindowLimits, *, streamed: bool = True
) -> Sample | None:
    """What a request the client hung up on after `elapsed_s` tells its window: a request at
    least that slow when it hung up after a latency bound (TTFT: no first token by then, or a
    late one; end to end: past the bound), else nothing. Without this, a version so slow that
    every client gives up never fills a window and is never rolled back; with every hang-up
    counted, an impatient client would count against a healthy one. Not an error: the
    version failed no request. Its latency is a lower bound: the request never finished.
    `streamed` False: the engine hands over every token at the end, so a missing first token
    says nothing about TTFT (it may have come in 10 ms); only the end-to-end bound judges."""
    ttft_bound, e2e_bound = limits.ttft_bound_ms, limits.e2e_bound_ms
    first_token_s = ttft_s
    if first_token_s is None and streamed:
        first_token_s = elapsed_s  # no token yet: TTFT >= elapsed
    late_ttft = (
        ttft_bound is not None and first_token_s is not None and first_token_s * 1000 > ttft_bound
    )
    late_e2e = e2e_bound is not None and elapsed_s * 1000 > e2e_bound
    if not (late_ttft or late_e2e):
        return None
    return Sample(first_token_s, elapsed_s, False)


@dataclass
class _Observation:
    ttft_ms: float | None  # None: no token came (an error before the first token)
    e2e_ms: float
    error: bool


class VersionWindow:
    def __init__(self, size: int):
        self._samples: deque[_Observation] = deque(maxlen=size)

    def record(self, *, ttft_s: float | None, e2e_s: float, error: bool) -> None:
        ttft_ms = None if ttft_s is None else ttft_s * 1000
        self._samples.append(_Observation(ttft_ms, e2e_s * 1000, error))

    @property
    def full(self) -> bool:
        return len(self._samples) == self._samples.maxlen

    def clear(self) -> None:
        self._samples.clear()

    def figures(self) -> WindowFigures:
        samples = list(self._samples)
        errors = sum(1 for s in samples if s.error)
        ok = [s for s in samples if not s.error]  # latency of failures says nothing useful
        return WindowFigures(
            samples=len(samples),
            p95_ttft_ms=p95([s.ttft_ms for s in ok if s.ttft_ms is not None]),
            p95_e2e_ms=p95([s.e2e_ms for s in ok]),
            error_rate=errors / len(samples) if samples else 0.0,
        )


def judge(figures: WindowFigures, limits: WindowLimits) -> Verdict | None:
    """The first rule a full window breaks, errors first (they hurt users most)."""
    if figures.error_rate > limits.max_error_rate:
        return Verdict(
            "error_rate",
            figures,
            f"error rate {figures.error_rate:.2%} > {limits.max_error_rate:.2%} over "
            f"{figures.samples} requests",
        )
    ttft = ("ttft_p95", "p95 TTFT", figures.p95_ttft_ms, limits.sla_p95_ttft_ms)
    e2e = ("latency_p95", "p95 latency", figures.p95_e2e_ms, limits.sla_p95_e2e_ms)
    checks = ((*ttft, limits.max_p95_ttft_ms), (*e2e, limits.max_p95_e2e_ms))
    for reason, label, value, sla, bound in checks:
        if value is None:
            continue
        if sla is not None and value > sla + limits.margin_ms:
            return Verdict(
                reason,
                figures,
                f"{label} {value:.1f} ms > SLA {sla:g} ms + {limits.margin_ms:g} ms margin",
            )
        if bound is not None and value > bound:
            return Verdict(reason, figures, f"{label} {value:.1f} ms > bound {bound:g} ms")
    return None


# Windows kept for versions nobody judges yet (possible fallback targets): least recently
# served dropped first, so memory stays bounded however many adapters serve.
MAX_WINDOWS = 4096
# A fallback target is "failing" on this much evidence, full window or not: one bad request of
# three is no proof, ten are.
MIN_TARGET_SAMPLES = 10


class RollbackMonitor:
    """Windows for every served version, keyed by its address ("name@N", "base"). `observe`
    returns a verdict at most once per full window of evidence; `healthy` says whether a full
    window passed (promotion); `failing` whether a would-be fallback target is breaching now."""

    def __init__(self, max_windows: int = MAX_WINDOWS) -> None:
        self._windows: OrderedDict[Hashable, VersionWindow] = OrderedDict()
        self._max_windows = max_windows

    def _window(self, key: Hashable, limits: WindowLimits) -> VersionWindow:
        window = self._windows.get(key)
        if window is None or window._samples.maxlen != limits.window:
            window = self._windows[key] = VersionWindow(limits.window)
            while len(self._windows) > self._max_windows:
                self._windows.popitem(last=False)
        self._windows.move_to_end(key)
        return window

    def record(
        self,
        key: Hashable,
        limits: WindowLimits,
        *,
        ttft_s: float | None,
        e2e_s: float,
        error: bool,
    ) -> VersionWindow:
        """Add one finished request to `key`'s window without judging it."""
        window = self._window(key, limits)
        window.record(ttft_s=ttft_s, e2e_s=e2e_s, error=error)
        return window

    def observe(
        self,
        key: Hashable,
        limits: WindowLimits,
        *,
        ttft_s: float | None,
        e2e_s: float,
        error: bool,
    ) -> Verdict | None:
        window = self.record(key, limits, ttft_s=ttft_s, e2e_s=e2e_s, error=error)
        if not window.full:
            return None
        verdict = judge(window.figures(), limits)
        if verdict is not None:
            window.clear()  # the next verdict needs a whole new window
        return verdict

    def healthy(self, key: Hashable, limits: WindowLimits) -> bool:
        window = self._windows.get(key)
        return window is not None and window.full and judge(window.figures(), limits) is None

    def failing(self, key: Hashable, limits: WindowLimits) -> bool:
        """Whether `key`'s recent requests break `limits` (at least MIN_TARGET_SAMPLES of them,
        or a full smaller window): a target not to fall back into."""
        window = self._windows.get(key)
        if window is None:
            return False
        figures = window.figures()
        if figures.samples < min(MIN_TARGET_SAMPLES, limits.window):
            return False
        return judge(figures, limits) is not None

    def addresses(self) -> list[Hashable]:
        return list(self._windows)

    def figures(self, key: Hashable) -> WindowFigures | None:
        window = self._windows.get(key)
        return None if window is None else window.figures()

    def reset(self, key: Hashable) -> None:
        self._windows.pop(key, None)
