"""What is measured: the scenarios, their load settings and the seeded workloads they send.

Every workload (prompts, which adapter each request names, Poisson gaps, cold-probe adapters)
is a pure function of the seed and the scenario name, so both systems get exactly the same
requests in the same order.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from benchmarks.serve.assets import BASE_MODEL_NAME, adapter_name
from benchmarks.serve.load import RequestSpec
from benchmarks.serve.servers import DEFAULT_ENGINE_FLAGS, SYSTEMS

# Plain words the demo tokenizer was trained on, so prompts tokenize to about one token a word.
WORDS = (
    "the a of to in and is are be adapter model tenant gateway serve request token batch rank "
    "layer weight memory page cache rollout canary latency error hello world user assistant "
    "question answer please thank you what why how when where which this that it they we our "
    "data code fast slow good new first last next time day work make take find think know see"
).split()


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    kind: Literal["load", "cold"]
    adapters: int  # registered on the server
    active: int = 0  # requests spread over the first `active` adapters; 0 = base model only
    zipf: float | None = None  # popularity exponent over the active adapters; None = uniform
    # Per-system engine flags on top of DEFAULT_ENGINE_FLAGS, e.g. {"loraplex": {...}}.
    engine: Mapping[str, Mapping[str, str | int | float]] = field(default_factory=dict)

    def flags(self, system: str) -> dict[str, str | int | float]:
        return {**DEFAULT_ENGINE_FLAGS, **self.engine.get(system, {})}


@dataclass(frozen=True)
class LoadSettings:
    requests: int = 200  # measured requests per phase
    warmup: int = 32  # sent before the closed-loop phase, excluded from every number
    concurrency: int = 16
    max_tokens: int = 32
    prompt_words: int = 24
    # Open loop: Poisson arrivals at this fraction of the first system's closed-loop req/s for
    # the same scenario in the same run, so the offered load fits the machine (2 CPU cores or
    # a GPU) and both systems get the same absolute arrival times.
    open_load: float = 0.7
    cold_probes: int = 10
    seed: int = 0


# Equal adapter-weight memory: by default both engines are vLLM with max_loras 4 x max_lora_rank
# 32. loraplex's paged pool (issue 9) is measured at that memory with
#   --engine loraplex:paged_lora=1 --engine loraplex:paged_pool_bytes=4194304
#   --engine loraplex:max_loras=16
# (4 MiB is lora_slot_bytes() of the demo base at the default flags; see README).
FULL_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("base", "base model only", "load", adapters=0),
    Scenario("lora3", "3 adapters, uniform", "load", adapters=3, active=3),
    Scenario("zipf64", "64 adapters, Zipf 0.8", "load", adapters=64, active=64, zipf=0.8),
    Scenario("cold", "cold adapter (registered, never used)", "cold", adapters=1000),
    Scenario("zipf1000", "1000 adapters, Zipf 0.8", "load", adapters=1000, active=1000, zipf=0.8),
)
FULL_SETTINGS = LoadSettings()
QUICK_SETTINGS = LoadSettings(
    requests=48, warmup=8, concurrency=8, max_tokens=16, prompt_words=16, cold_probes=3
)


def _rng(seed: int, scenario: str, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(scenario.encode()), zlib.crc32(stream.encode())])


def popularity(active: int, zipf: float | None) -> np.ndarray:
    """Probability of each of the first `active` adapters; index 0 the most popular."""
    if zipf is None:
        return np.full(active, 1.0 / active)
    weights = 1.0 / np.arange(1, active + 1, dtype=np.float64) ** zipf
    return weights / weights.sum()


def workload(
    scenario: Scenario, settings: LoadSettings, stream: str, count: int
) -> list[RequestSpec]:
    """`count` requests of `scenario`; `stream` ("warmup", "closed", "open") picks the seed."""
    rng = _rng(settings.seed, scenario.name, stream)
    if scenario.active:
        picks = rng.choice(
            scenario.active, size=count, p=popularity(scenario.active, scenario.zipf)
        )
        models = [adapter_name(int(i)) for i in picks]
    else:
        models = [BASE_MODEL_NAME] * count
    return [RequestSpec(model, _prompt(rng, settings.prompt_words)) for model in models]


def cold_prompt(settings: LoadSettings) -> str:
    """The one prompt every cold and warm probe sends."""
    return _prompt(_rng(settings.seed, "cold", "prompt"), settings.prompt_words)


def _prompt(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def poisson_arrivals(scenario: Scenario, settings: LoadSettings, rate: float) -> list[float]:
    """Send times (s from the start) of a Poisson process of `rate` req/s, fixed by the seed."""
    gaps = _rng(settings.seed, scenario.name, "arrivals").exponential(1.0, settings.requests)
    times = np.cumsum(gaps) - gaps[0]  # the first request goes at once
    return [float(t) / rate for t in times]


def cold_adapters(
    scenario: Scenario,
    settings: LoadSettings,
    used: set[str],
    protected_tail: int,
) -> list[str]:
    """Registered adapters no request of the run ever names, picked by the seed.

    vLLM's server loads every `--lora-modules` adapter at start, keeping the last
    `protected_tail` (max_cpu_loras) in its CPU cache: those would be warm there, so they are
    left out for both systems.
    """
    pool = [adapter_name(i) for i in range(max(scenario.adapters - protected_tail, 0))]
    candidates = [name for name in pool if name not in used]
    if len(candidates) < settings.cold_probes:
        raise ValueError(
            f"scenario {scenario.name}: {len(candidates)} never-used adapters, "
            f"{settings.cold_probes} cold probes asked"
        )
    rng = _rng(settings.seed, scenario.name, "cold")
    picks = rng.choice(len(candidates), size=settings.cold_probes, replace=False)
    return [candidates[int(i)] for i in picks]


def used_adapters(scenarios: list[Scenario], settings: LoadSettings) -> set[str]:
    """Every adapter any load phase of the run names (warm-up included)."""
    used: set[str] = set()
    for scenario in scenarios:
        if scenario.kind != "load":
            continue
        for stream, count in (
            ("warmup", settings.warmup),
            ("closed", settings.requests),
            ("open", settings.requests),
        ):
            used.update(spec.model for spec in workload(scenario, settings, stream, count))
    return used


def loraplex_setting_names() -> frozenset[str]:
    from gateway.settings import Settings

    return frozenset(Settings.model_fields)


def with_engine_overrides(
    scenarios: tuple[Scenario, ...], overrides: list[str]
) -> tuple[Scenario, ...]:
    """Apply `[SCENARIO/]SYSTEM:KEY=VALUE` overrides (from --engine) to the scenarios."""
    result = list(scenarios)
    for item in overrides:
        target, _, assignment = item.rpartition(":")
        key, sep, value = assignment.partition("=")
        scope, _, system = target.rpartition("/")
        if not sep or not key or system not in SYSTEMS:
            raise ValueError(f"--engine {item!r}: expected [SCENARIO/]SYSTEM:KEY=VALUE")
        if scope and scope not in {s.name for s in scenarios}:
            raise ValueError(f"--engine {item!r}: no scenario {scope!r}")
        if system == "loraplex" and key not in loraplex_setting_names():
            # The gateway ignores an environment variable it has no setting for: a misspelt
            # key would run the default while results.json recorded the flag as applied.
            raise ValueError(f"--engine {item!r}: loraplex has no setting {key!r}")
        for i, scenario in enumerate(result):
            if scope in ("", scenario.name):
                engine = {name: dict(flags) for name, flags in scenario.engine.items()}
                engine.setdefault(system, {})[key] = value
                result[i] = replace(scenario, engine=engine)
    return tuple(result)
