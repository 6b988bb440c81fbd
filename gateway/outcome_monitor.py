"""Per judged version: a sliding window of its callers' task verdicts (`POST /v1/feedback`) and
the rules that roll it back on them (seed §8: task success under 90 % over 100 → the frozen
baseline; a safety incident → immediate rollback); and a window of the tool calls it wrote
under tool_choice "auto", judged valid or not by the gateway (seed §8: tool-call success under
95 %; §7: a schema failure rolls back).

Pure state like the rollback monitor: the feedback service feeds it, the rollout controller
acts on the verdicts. Only success and failure fill the window; the other outcomes (overrides,
corrections, schema failures, false refusals) are counted in metrics and alerted on, as their
seed targets are rates of all responses, which the gateway counts, not of feedback.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum

from gateway.rollback_monitor import MAX_WINDOWS, Verdict


class Outcome(StrEnum):
    SUCCESS = "success"  # the task succeeded
    FAILURE = "failure"  # it did not
    HUMAN_OVERRIDE = "human_override"  # a reviewer replaced the answer
    USER_CORRECTION = "user_correction"  # the user had to correct it
    SCHEMA_FAILURE = "schema_failure"  # the answer broke the expected output format
    FALSE_REFUSAL = "false_refusal"  # the model refused what it should have answered
    SAFETY_INCIDENT = "safety_incident"  # rolls the version back at once


TASK_OUTCOMES = {Outcome.SUCCESS: True, Outcome.FAILURE: False}


@dataclass(frozen=True)
class OutcomeFigures:
    feedback: int  # task verdicts in the window (success + failure)
    task_success_rate: float | None
    incident: str | None = None  # the response id of a safety incident

    def as_dict(self) -> dict[str, float | int | str | None]:
        figures: dict[str, float | int | str | None] = {
            "feedback": self.feedback,
            "task_success_rate": self.task_success_rate,
        }
        if self.incident is not None:
            figures["incident_response_id"] = self.incident
        return figures


class OutcomeWindows:
    """Windows keyed like the rollback monitor's, least recently fed dropped first."""

    def __init__(self, max_windows: int = MAX_WINDOWS) -> None:
        self._windows: OrderedDict[Hashable, deque[bool]] = OrderedDict()
        self._max_windows = max_windows

    def record(self, key: Hashable, succeeded: bool, size: int) -> OutcomeFigures:
        return OutcomeFigures(*self.share(key, succeeded, size))

    def share(self, key: Hashable, good: bool, size: int) -> tuple[int, float]:
        """Record one outcome; (outcomes in the window, the share of good ones)."""
        window = self._windows.get(key)
        if window is None or window.maxlen != size:
            window = self._windows[key] = deque(maxlen=size)
            while len(self._windows) > self._max_windows:
                self._windows.popitem(last=False)
        self._windows.move_to_end(key)
        window.append(good)
        return len(window), sum(window) / len(window)

    def full(self, key: Hashable) -> bool:
        window = self._windows.get(key)
        return window is not None and len(window) == window.maxlen

    def reset(self, key: Hashable) -> None:
        self._windows.pop(key, None)


def judge_task_success(figures: OutcomeFigures, min_rate: float | None) -> Verdict | None:
    """A full window's verdict: None while the success rate holds (or no minimum is set)."""
    rate = figures.task_success_rate
    if min_rate is None or rate is None or rate >= min_rate:
        return None
    return Verdict(
        "task_success",
        figures,
        f"task success {rate:.1%} < {min_rate:.1%} over {figures.feedback} feedback verdicts",
    )


@dataclass(frozen=True)
class ToolCallFigures:
    tool_calls: int  # calls in the window
    tool_call_validity: float  # the share of valid ones

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"tool_calls": self.tool_calls, "tool_call_validity": self.tool_call_validity}


def judge_tool_calls(figures: ToolCallFigures, min_rate: float | None) -> Verdict | None:
    """A full window's verdict: None while the valid share holds (or no minimum is set)."""
    rate = figures.tool_call_validity
    if min_rate is None or rate >= min_rate:
        return None
    return Verdict(
        "tool_calls",
        figures,
        f"valid tool calls {rate:.1%} < {min_rate:.1%} over {figures.tool_calls} calls",
    )


def safety_verdict(response_id: str) -> Verdict:
    return Verdict(
        "safety_incident",
        OutcomeFigures(0, None, incident=response_id),
        f"safety incident reported on response {response_id}",
        persistent=True,
    )
