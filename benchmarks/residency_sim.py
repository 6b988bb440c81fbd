"""What admission can and cannot buy at a given adapter memory: a step-level simulation.

The serving benchmark (`benchmarks/serve`) takes minutes per point and its vLLM baseline moves
by ±25 % between runs on 2 CPU cores, so it cannot tell admission policies apart. This runs the
real planner (`kernels.paged_admission.AdmissionPlanner`) against a synthetic engine: each step
decodes one token for every running request and prefills the newly admitted ones, a request
holds its adapter's pages from admission to its last token, and an adapter's pages are free
again when none of its requests runs. vLLM's slots are the same planner with every adapter
costing one of `max_loras` pages, which is how its scheduler treats LoRA slots.

    python -m benchmarks.residency_sim                  # closed and open loop, 64 and 1000
    python -m benchmarks.residency_sim --pages 1000000  # an unbounded pool: the floor

It models scheduling only: no adapter loads from disk, no host-cache misses, no gateway. Step
costs are rough figures for the tiny demo model on 2 CPU cores (benchmarks/results/serve):
~8 ms a step, +0.4 ms per running sequence, +4 ms per prefill.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kernels.paged_admission import AdmissionPlanner, Waiting, pages_for_rank

# benchmarks/serve/assets.py draws each adapter's rank uniformly from these.
RANKS = (4, 8, 16, 32)
STEP_S, PER_SEQ_S, PER_PREFILL_S = 0.008, 0.0004, 0.004
WARMUP_REQUESTS = 200


@dataclass
class Request:
    adapter: int
    pages: int
    arrival: float
    tokens_left: int


@dataclass(frozen=True)
class Load:
    adapters: int = 64
    zipf: float = 0.8
    output_tokens: int = 32
    concurrency: int = 16  # closed loop: this many clients, each sends again when answered
    open_rate: float | None = None  # open loop: Poisson arrivals per second instead
    requests: int = 3000
    max_num_seqs: int = 64
    seed: int = 0


@dataclass
class Outcome:
    req_per_s: float
    ttft_s: list[float] = field(default_factory=list)

    def ttft_ms(self, q: float) -> float:
        return float(np.percentile(self.ttft_s[WARMUP_REQUESTS:], q) * 1000)


def simulate(load: Load, planner: AdmissionPlanner, cost: Callable[[int], int]) -> Outcome:
    """`cost(rank)`: pages an adapter of that rank takes in `planner`'s pool."""
    rng = np.random.default_rng(load.seed)
    ranks = rng.choice(RANKS, size=load.adapters)
    popularity = np.arange(1, load.adapters + 1, dtype=float) ** -load.zipf
    popularity /= popularity.sum()

    def request(now: float) -> Request:
        adapter = int(rng.choice(load.adapters, p=popularity)) + 1
        return Request(adapter, cost(int(ranks[adapter - 1])), now, load.output_tokens)

    now, finished = 0.0, 0
    waiting: list[Request] = []
    running: list[Request] = []
    ttft: list[float] = []
    next_arrival = float("inf")
    if load.open_rate is None:
        waiting = [request(0.0) for _ in range(load.concurrency)]
    else:
        next_arrival = rng.exponential(1 / load.open_rate)
    while finished < load.requests:
        while next_arrival <= now:
            waiting.append(request(next_arrival))
            next_arrival += rng.exponential(1 / load.open_rate)  # type: ignore[operator]
        if not waiting and not running:
            now = next_arrival
            continue
        in_step = {r.adapter: r.pages for r in running}
        plan = planner.plan(
            in_step, [Waiting(r, r.adapter, r.pages, r.arrival) for r in waiting], now
        )
        room = load.max_num_seqs - len(running)
        admitted: list[Request] = [w.key for w in plan.order][:room]  # type: ignore[misc]
        taken = {id(r) for r in admitted}
        waiting = [r for r in waiting if id(r) not in taken]
        running += admitted
        now += STEP_S + PER_SEQ_S * len(running) + PER_PREFILL_S * len(admitted)
        ttft += [now - r.arrival for r in admitted]
        for r in running:
            r.tokens_left -= 1
        done = [r for r in running if r.tokens_left <= 0]
        running = [r for r in running if r.tokens_left > 0]
        finished += len(done)
        if load.open_rate is None:
            waiting += [request(now) for _ in done]
    return Outcome(finished / now, ttft)


def paged(
    pages: int, page_size: int = 4, max_wait_s: float = 10.0
) -> tuple[AdmissionPlanner, Callable[[int], int]]:
    """loraplex's pool: an adapter takes ⌈rank / page_size⌉ of `pages`."""
    planner = AdmissionPlanner(total_pages=pages, max_wait_s=max_wait_s)
    return planner, lambda rank: pages_for_rank(rank, page_size)


def slots(max_loras: int) -> tuple[AdmissionPlanner, Callable[[int], int]]:
    """vLLM's slots: any adapter takes one of `max_loras`; nothing ages."""
    return AdmissionPlanner(total_pages=max_loras, max_wait_s=float("inf")), lambda rank: 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=32, help="loraplex pool pages (4 rank rows)")
    parser.add_argument("--max-loras", type=int, default=4, help="vLLM slots (same memory: 4)")
    parser.add_argument("--max-wait-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    print("| load | system | req/s | TTFT p50 ms | TTFT p95 ms |")
    print("|---|---|---:|---:|---:|")
    loads = [
        ("closed zipf64", Load()),
        ("closed zipf1000", Load(adapters=1000)),
        ("open 11/s zipf64", Load(open_rate=11.0, requests=2000)),
        ("open 11/s zipf1000", Load(adapters=1000, open_rate=11.0, requests=2000)),
    ]
    for label, load in loads:
        systems = [
            ("vllm", slots(args.max_loras)),
            ("loraplex", paged(args.pages, max_wait_s=args.max_wait_s)),
        ]
        for system, (planner, cost) in systems:
            out = simulate(load, planner, cost)
            row = f"{out.req_per_s:.1f} | {out.ttft_ms(50):.0f} | {out.ttft_ms(95):.0f}"
            print(f"| {label} | {system} | {row} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
