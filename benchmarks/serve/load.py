"""Load generation against an OpenAI-compatible server: streaming completions, timed per request.

One request is a streamed `POST /v1/completions` (SSE) with `ignore_eos` and a fixed
`max_tokens`, so every output has the same length. Per request:
  TTFT  time from sending to the first chunk that carries text (a token that decodes to an
        incomplete UTF-8 sequence streams as an empty chunk and does not count),
  e2e   time from sending to `data: [DONE]`,
  TPOT  (e2e - TTFT) / (tokens - 1), tokens from the final usage chunk.
A non-200 answer, a broken stream or an output of the wrong length is an error. Each request
also records a digest of the text it streamed, so the two systems' outputs for the same request
(same seed, temperature 0) can be compared: a server that streamed the base model's output, or
another adapter's, would show up as disagreement, not as speed.

aiohttp rather than the openai client: the load generator shares the CPU with the server, and
aiohttp's SSE path costs the least per chunk (it is what vLLM's own serving benchmark uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

REQUEST_TIMEOUT_S = 600

BENCH_API_KEY = "loraplex-benchmark-key-0123456789"


@dataclass(frozen=True)
class RequestSpec:
    model: str
    prompt: str


@dataclass
class Sample:
    model: str
    sent_s: float  # offset from the phase start
    index: int = 0  # the request's position in its phase's workload
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    output_sha: str | None = None  # sha256 of the streamed text, first 16 hex digits

    @property
    def tpot_s(self) -> float | None:
        if self.error or self.ttft_s is None or self.e2e_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


@dataclass
class PhaseRun:
    samples: list[Sample] = field(default_factory=list)
    duration_s: float = 0.0
    client_stalls_s: list[float] = field(default_factory=list)  # see ClientStallMonitor


class ClientStallMonitor:
    """Times how late this client's own event loop wakes up during a phase.

    The client shares the machine with the server it measures; when the OS does not run it
    (2 cores, servers spinning between steps), its sends go out late and whole streams are read
    at once, and that delay lands in the server's TTFT. A task sleeping TICK_S records every
    wake-up later than STALL_S: a phase whose client stalled for seconds is visible in the
    results instead of read as the server's latency.
    """

    TICK_S = 0.01
    STALL_S = 0.05

    def __init__(self) -> None:
        self.stalls: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.TICK_S)
            now = time.perf_counter()
            late = now - last - self.TICK_S
            if late > self.STALL_S:
                self.stalls.append(late)
            last = now

    async def __aenter__(self) -> ClientStallMonitor:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def completion_body(spec: RequestSpec, max_tokens: int) -> dict[str, object]:
    return {
        "model": spec.model,
        "prompt": spec.prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    spec: RequestSpec,
    max_tokens: int,
    t0: float,
    index: int = 0,
) -> Sample:
    start = time.perf_counter()
    sample = Sample(model=spec.model, sent_s=start - t0, index=index)
    try:
        async with session.post(
            f"{base_url}/v1/completions", json=completion_body(spec, max_tokens)
        ) as response:
            if response.status != 200:
                body = (await response.text())[:300]
                sample.error = f"HTTP {response.status}: {body}"
                return sample
            done = await _read_stream(response, sample, start)
        sample.e2e_s = time.perf_counter() - start
        if not done:
            sample.error = "stream ended without [DONE]"
        elif sample.ttft_s is None:
            sample.error = "no content chunk"
        elif sample.tokens != max_tokens:
            sample.error = f"{sample.tokens} tokens, expected {max_tokens}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    return sample


async def _read_stream(response: aiohttp.ClientResponse, sample: Sample, start: float) -> bool:
    digest = hashlib.sha256()
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            sample.output_sha = digest.hexdigest()[:16]
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            raise ValueError(f"error in stream: {chunk['error']}")
        choices = chunk.get("choices") or []
        text = choices[0].get("text") if choices else None
        if text:
            if sample.ttft_s is None:
                sample.ttft_s = time.perf_counter() - start
            digest.update(text.encode())
        usage = chunk.get("usage")
        if usage:
            sample.tokens = int(usage.get("completion_tokens") or 0)
            sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return False


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # loraplex authenticates every /v1 call (servers.py registers this key at start-up);
        # vLLM started without --api-key ignores the header, so both systems get the same bytes.
        headers={"Authorization": f"Bearer {BENCH_API_KEY}"},
        # Idle connections are dropped before either server's keep-alive timeout (vLLM's and
        # uvicorn's default is 5 s): reusing one the server is closing fails the request with
        # "server disconnected", which measures the client, not the server.
        connector=aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=3.0),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


async def closed_loop(
    base_url: str,
    requests: Sequence[RequestSpec],
    concurrency: int,
    max_tokens: int,
    on_done: Callable[[Sample], None] | None = None,
) -> PhaseRun:
    """`concurrency` clients, each sending its next request as soon as the last one finished."""
    run = PhaseRun()
    queue = enumerate(requests)
    async with _session() as session, ClientStallMonitor() as monitor:
        t0 = time.perf_counter()

        async def client() -> None:
            for index, spec in queue:  # a shared iterator: each request is taken exactly once
                sample = await send(session, base_url, spec, max_tokens, t0, index)
                run.samples.append(sample)
                if on_done:
                    on_done(sample)

        await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
        run.duration_s = time.perf_counter() - t0
    run.client_stalls_s = monitor.stalls
    return run


async def open_loop(
    base_url: str,
    requests: Sequence[RequestSpec],
    arrivals_s: Sequence[float],
    max_tokens: int,
    on_done: Callable[[Sample], None] | None = None,
) -> PhaseRun:
    """Send request i at arrivals_s[i] after the start, whatever is still in flight."""
    if len(arrivals_s) != len(requests):
        raise ValueError("one arrival time per request")
    run = PhaseRun()
    async with _session() as session, ClientStallMonitor() as monitor:
        t0 = time.perf_counter()

        async def one(index: int, spec: RequestSpec) -> None:
            sample = await send(session, base_url, spec, max_tokens, t0, index)
            run.samples.append(sample)
            if on_done:
                on_done(sample)

        tasks = []
        for index, (spec, at) in enumerate(zip(requests, arrivals_s, strict=True)):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, spec)))
        await asyncio.gather(*tasks)
        run.duration_s = time.perf_counter() - t0
    run.client_stalls_s = monitor.stalls
    return run


async def sequential(
    base_url: str,
    requests: Sequence[RequestSpec],
    max_tokens: int,
    on_done: Callable[[Sample], None] | None = None,
) -> PhaseRun:
    """One request at a time on an otherwise idle server (cold-adapter probes)."""
    return await closed_loop(base_url, requests, 1, max_tokens, on_done)
