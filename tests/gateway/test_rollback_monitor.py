"""The rollback decision rules on synthetic windows: which figures breach, when a verdict may
come, and that one window of evidence yields at most one verdict."""

from __future__ import annotations

import pytest

from gateway.rollback_monitor import (
    RollbackMonitor,
    Sample,
    WindowFigures,
    WindowLimits,
    hang_up_sample,
    judge,
    p95,
)


def test_p95_is_nearest_rank():
    assert p95([]) is None
    assert p95([5.0]) == 5.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0


SLA = WindowLimits(sla_p95_ttft_ms=100, sla_p95_e2e_ms=1000, margin_ms=15)


@pytest.mark.parametrize(
    ("figures", "limits", "reason"),
    [
        (WindowFigures(100, 80, 900, 0.0), SLA, None),
        (WindowFigures(100, 115, 1015, 0.0), SLA, None),  # exactly SLA + margin: not a breach
        (WindowFigures(100, 115.1, 900, 0.0), SLA, "ttft_p95"),
        (WindowFigures(100, 80, 1015.1, 0.0), SLA, "latency_p95"),
        (WindowFigures(100, 80, 900, 0.001), SLA, None),  # 0.1 % is the limit, not over it
        (WindowFigures(100, 80, 900, 0.01), SLA, "error_rate"),
        (WindowFigures(100, 500, 5000, 0.02), SLA, "error_rate"),  # errors are judged first
        (WindowFigures(100, 80, 130, 0.0), WindowLimits(max_p95_e2e_ms=120), "latency_p95"),
        (WindowFigures(100, 80, 119, 0.0), WindowLimits(max_p95_e2e_ms=120), None),
        (WindowFigures(100, None, None, 0.0), SLA, None),  # no successful sample, no latency
        (WindowFigures(100, 10_000, 99_000, 0.0), WindowLimits(), None),  # no SLA, no bound
    ],
)
def test_judge(figures, limits, reason):
    verdict = judge(figures, limits)
    assert (verdict.reason if verdict else None) == reason


def feed(monitor, version, limits, n, *, e2e_s=0.1, ttft_s=0.01, error=False):
    verdicts = []
    for _ in range(n):
        verdict = monitor.observe(version, limits, ttft_s=ttft_s, e2e_s=e2e_s, error=error)
        if verdict:
            verdicts.append(verdict)
    return verdicts


def test_no_verdict_before_a_full_window():
    monitor = RollbackMonitor()
    limits = WindowLimits(window=100, max_p95_e2e_ms=120)
    assert feed(monitor, 1, limits, 99, e2e_s=5.0) == []
    verdicts = feed(monitor, 1, limits, 1, e2e_s=5.0)
    assert [v.reason for v in verdicts] == ["latency_p95"]
    assert verdicts[0].figures.samples == 100 and verdicts[0].figures.p95_e2e_ms == 5000


def test_one_verdict_per_window_of_evidence():
    monitor = RollbackMonitor()
    limits = WindowLimits(window=10, max_p95_e2e_ms=120)
    verdicts = feed(monitor, 1, limits, 35, e2e_s=1.0)
    assert len(verdicts) == 3  # at 10, 20, 30: never twice on the same samples


def test_a_few_slow_requests_do_not_move_p95_but_many_do():
    monitor = RollbackMonitor()
    limits = WindowLimits(window=100, max_p95_e2e_ms=120)
    assert feed(monitor, 1, limits, 95, e2e_s=0.05) == []
    assert feed(monitor, 1, limits, 5, e2e_s=2.0) == []  # 5 % slow: p95 is still fast
    assert monitor.healthy(1, limits)
    assert [v.reason for v in feed(monitor, 1, limits, 1, e2e_s=2.0)] == ["latency_p95"]


def test_one_error_in_a_hundred_breaches_the_seed_error_rate():
    monitor = RollbackMonitor()
    limits = WindowLimits(window=100)
    feed(monitor, 1, limits, 99)
    verdicts = feed(monitor, 1, limits, 1, error=True, ttft_s=None)
    assert [v.reason for v in verdicts] == ["error_rate"]
    assert verdicts[0].figures.error_rate == pytest.approx(0.01)


def test_versions_are_judged_apart():
    monitor = RollbackMonitor()
    limits = WindowLimits(window=10, max_p95_e2e_ms=120)
    assert feed(monitor, 1, limits, 10, e2e_s=0.05) == []
    assert len(feed(monitor, 2, limits, 10, e2e_s=1.0)) == 1
    assert monitor.healthy(1, limits) and not monitor.healthy(2, limits)
    monitor.reset(2)
    assert monitor.figures(2) is None and not monitor.healthy(2, limits)


def test_limits_are_validated():
    with pytest.raises(ValueError):
        WindowLimits(window=0)
    with pytest.raises(ValueError):
        WindowLimits(max_error_rate=1.5)


def test_a_target_is_failing_on_ten_bad_requests_without_a_verdict_of_its_own():
    monitor = RollbackMonitor()
    limits = WindowLimits(window=100)
    for _ in range(9):
        monitor.record("alt@1", limits, ttft_s=0.01, e2e_s=0.1, error=True)
    assert not monitor.failing("alt@1", limits)  # nine requests are not enough evidence
    monitor.record("alt@1", limits, ttft_s=0.01, e2e_s=0.1, error=True)
    assert monitor.failing("alt@1", limits)
    assert monitor.figures("alt@1").samples == 10  # recording never clears a window
    assert not monitor.failing("never-served@1", limits)
    for _ in range(10):
        monitor.record("ok@1", limits, ttft_s=0.01, e2e_s=0.1, error=False)
    assert not monitor.failing("ok@1", limits)


def test_windows_are_bounded_least_recently_served_first():
    monitor = RollbackMonitor(max_windows=3)
    limits = WindowLimits(window=10)
    for key in ("a@1", "b@1", "c@1", "a@1", "d@1"):
        monitor.record(key, limits, ttft_s=None, e2e_s=0.1, error=False)
    assert sorted(monitor.addresses()) == ["a@1", "c@1", "d@1"]  # b was the least recent


BOUNDED = WindowLimits(sla_p95_ttft_ms=100, sla_p95_e2e_ms=1000, margin_ms=15, max_p95_e2e_ms=900)


@pytest.mark.parametrize(
    ("ttft_s", "elapsed_s", "limits", "sample"),
    [
        (None, 0.05, BOUNDED, None),  # gave up before any bound: says nothing
        (0.01, 0.5, BOUNDED, None),  # first token in time, gone before the e2e bound
        (None, 0.2, BOUNDED, Sample(0.2, 0.2, False)),  # no first token by the TTFT bound
        (0.3, 0.4, BOUNDED, Sample(0.3, 0.4, False)),  # its first token came late
        (0.01, 0.95, BOUNDED, Sample(0.01, 0.95, False)),  # past the absolute e2e bound
        (None, 0.116, WindowLimits(sla_p95_ttft_ms=100, margin_ms=15), Sample(0.116, 0.116, False)),
        (None, 0.114, WindowLimits(sla_p95_ttft_ms=100, margin_ms=15), None),
        (None, 60.0, WindowLimits(), None),  # no latency bound at all: nothing to judge by
    ],
)
def test_a_hang_up_counts_only_after_a_latency_bound(ttft_s, elapsed_s, limits, sample):
    assert hang_up_sample(ttft_s, elapsed_s, limits) == sample


def test_a_non_streamed_hang_up_says_nothing_about_its_first_token():
    # stream=false: every token arrives at the end, so no first token yet may still mean a
    # 10 ms TTFT; only the end-to-end bound judges (a healthy canary was rolled back on a
    # TTFT of "the time the client waited").
    ttft_only = WindowLimits(sla_p95_ttft_ms=100, margin_ms=15)
    assert hang_up_sample(None, 0.4, ttft_only, streamed=False) is None
    assert hang_up_sample(None, 0.4, ttft_only, streamed=True) == Sample(0.4, 0.4, False)
    both = WindowLimits(sla_p95_ttft_ms=100, sla_p95_e2e_ms=300, margin_ms=15)
    assert hang_up_sample(None, 0.4, both, streamed=False) == Sample(None, 0.4, False)


def test_bounds_are_the_lowest_of_sla_plus_margin_and_the_absolute_bound():
    assert (BOUNDED.ttft_bound_ms, BOUNDED.e2e_bound_ms) == (115, 900)
    assert (WindowLimits().ttft_bound_ms, WindowLimits().e2e_bound_ms) == (None, None)
