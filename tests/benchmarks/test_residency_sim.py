"""The admission simulation runs the real planner: more pages never hurt, a pool bounded by
Σ rank admits more adapters than max-rank slots of the same memory, and everyone is served."""

from __future__ import annotations

from benchmarks.residency_sim import WARMUP_REQUESTS, Load, main, paged, simulate, slots


def run(load: Load, system) -> object:
    planner, cost = system
    return simulate(load, planner, cost)


def test_every_request_is_served_and_more_pages_never_hurt():
    load = Load(requests=800)
    small, large, unbounded = (run(load, paged(p)) for p in (16, 32, 10**6))
    assert len(small.ttft_s) >= load.requests > WARMUP_REQUESTS
    assert small.req_per_s <= large.req_per_s <= unbounded.req_per_s
    assert small.ttft_ms(95) >= large.ttft_ms(95) >= unbounded.ttft_ms(95)
    # an unbounded pool never makes anyone wait for pages: TTFT is a step or two
    assert unbounded.ttft_ms(95) < 0.25 * large.ttft_ms(95)


def test_pages_at_real_rank_beat_max_rank_slots_of_the_same_memory():
    load = Load(requests=800)
    vllm, loraplex = run(load, slots(4)), run(load, paged(32))  # both 128 rank rows
    assert loraplex.req_per_s > 1.3 * vllm.req_per_s
    assert loraplex.ttft_ms(95) < vllm.ttft_ms(95)


def test_open_loop_is_served_at_the_offered_rate():
    out = run(Load(open_rate=8.0, requests=600), paged(32))
    assert abs(out.req_per_s - 8.0) < 1.5


def test_cli_prints_the_table(capsys):
    assert main(["--pages", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 8 and all(line.startswith("|") for line in lines)
