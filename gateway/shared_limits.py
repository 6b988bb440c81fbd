"""Tenant limits shared by every gateway replica through Redis (LORAPLEX_LIMITS_REDIS_URL).

With per-process limits (gateway.limits) a tenant behind N replicas gets N x its policy. Here
each admission is one Redis script (gateway.shared_limit_scripts) that checks and charges the
tenant's requests-per-second and tokens-per-minute buckets and its concurrent sequences over all
replicas at once, with the store's clock: the policy holds for the deployment as a whole.

Concurrency: this process knows exactly which sequences it runs per tenant (`_counts`, counted
from the moment a request asks, so two of its admissions in flight see each other) and writes
that whole count, versioned, with every admission and release and again every `renew_s`. The
store keeps each replica's newest count with a deadline: a replica that crashed with requests
in flight stops counting once it passes (`alive_s`) instead of holding the tenant's slots for
good, and whatever went wrong with a write (lost, late, cut by a timeout or a client that hung
up, a store restarted empty) is right again at the next one.

When the store does not answer, that request is admitted under this process's own limits (as
without the setting; its concurrency still counts what this replica runs) rather than refused:
an outage of the limits store must not become an outage of the gateway. After
FAILURES_TO_DOWN failures in a row, or a failed renewal, the store counts as down (no round
trips, `loraplex_limit_store_up` 0, an alert) until the renewal finds it answering again. Tokens
to refund meanwhile wait and go back with the next write.

A tenant without limits costs no round trip and is not counted: a limit added while its
requests run counts those admitted after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from gateway.limits import (
    Lease,
    TenantLimiter,
    refuse_concurrent,
    refuse_requests,
    refuse_tokens,
    refuse_what_never_fits,
)
from gateway.metrics import (
    LIMIT_STORE_ADMISSION_DURATION,
    LIMIT_STORE_ERRORS,
    LIMIT_STORE_FALLBACKS,
    LIMIT_STORE_UP,
)
from gateway.shared_limit_scripts import ADMIT, REPORT
from registry.tenancy import TenantPolicy

logger = logging.getLogger(__name__)

# A store on the same network answers in well under a millisecond; past this the request goes on
# under this replica's own limits rather than wait. Waiting for a free connection counts too.
STORE_TIMEOUT_S = 0.25
MAX_CONNECTIONS = 64  # past this, admissions wait for a connection (a script takes ~0.1 ms)
WRITER_CONNECTIONS = 2  # one flush of released counts and one renewal at a time
FAILURES_TO_DOWN = 3  # one slow answer (a stalled event loop) is not an outage
ALIVE_S = 10.0  # a crashed replica's running sequences stop counting after this
RENEW_S = 1.0
KEEP_S = 600.0  # the count hashes of a tenant no replica writes vanish after this
STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
REFUSALS = {1: "max_concurrent", 2: "requests", 3: "tokens"}


@dataclass
class SharedLease(Lease):
    """A lease the store admitted: its unused tokens go back to the shared bucket."""


@dataclass
class FallbackLease(Lease):
    """A lease this process's own buckets admitted while the store did not answer."""

    local: Lease | None = None


class SharedLimiter:
    """AdmissionLimits over one Redis: `start()` in the app's lifespan, `close()` at its end."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "loraplex",
        alive_s: float = ALIVE_S,
        renew_s: float = RENEW_S,
        timeout_s: float = STORE_TIMEOUT_S,
    ):
        # Admissions, and apart from them the writes of counts (releases, renewals): a burst of
        # admissions must not keep the writes from a connection (fair waiting is not promised).
        self._pool, self._client = _client(url, MAX_CONNECTIONS, timeout_s)
        self._writer_pool, self._writer = _client(url, WRITER_CONNECTIONS, timeout_s)
        self._admit = self._client.register_script(ADMIT)
        self._report = self._client.register_script(REPORT)
        self._prefix = prefix
        self._local = TenantLimiter()  # the buckets of fallback admissions
        self._alive_ms = round(alive_s * 1000)
        self._keep_ms = round(max(KEEP_S, 2 * alive_s) * 1000)
        self._renew_s = renew_s
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._counts: Counter[str] = Counter()  # tenant -> sequences this replica runs
        self._version = 0  # increased on every change of _counts: the store keeps the newest
        self._dirty: set[str] = set()  # tenants whose newest count the store may lack
        self._refunds: Counter[str] = Counter()  # tenant -> tokens owed to its shared bucket
        self._failures = 0  # in a row
        self._up = True
        self._flushing: asyncio.Task[None] | None = None  # writes released counts
        self._renewing: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Probe the store and start renewing. An unreachable store is logged, not fatal: the
        gateway serves under per-replica limits until it answers."""
        try:
            await self._client.ping()
            self._set_up(True)
        except STORE_ERRORS as exc:
            self._set_up(False, exc)
        self._renewing = asyncio.create_task(self._renew_forever(), name="limit-store-renew")

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        if self._up:
            # Sequences still running stop counting now rather than at their deadline.
            pipe = self._writer.pipeline(transaction=False)
            for tenant in set(self._counts) | self._dirty:
                pipe.hdel(self._key(tenant, "run"), self.replica)
                pipe.hdel(self._key(tenant, "alive"), self.replica)
            try:
                await pipe.execute()
            except STORE_ERRORS:
                logger.warning("could not clear this replica's counts in the limits store")
        for client, pool in ((self._client, self._pool), (self._writer, self._writer_pool)):
            await client.aclose()
            await pool.aclose()

    # ---- AdmissionLimits -----------------------------------------------------------------
    async def acquire(
        self,
        tenant: str,
        policy: TenantPolicy,
        *,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int = 1,
    ) -> Lease:
        refuse_what_never_fits(
            tenant, policy, sequences=sequences, prompt_tokens=prompt_tokens, max_tokens=max_tokens
        )
        unlimited = (
            policy.requests_per_second is None
            and policy.tokens_per_minute is None
            and policy.max_concurrent is None
        )
        if unlimited:
            return Lease(self, tenant, max_tokens, sequences)
        self._change(tenant, sequences)
        count, version = self._counts[tenant], self._version
        try:
            if not self._up:
                return self._fallback(tenant, policy, prompt_tokens, max_tokens, sequences)
            return await self._admit_shared(
                tenant, policy, prompt_tokens, max_tokens, sequences, count, version
            )
        except BaseException:
            # Refused, failed, or the client hung up (cancelled) while the script ran: this
            # request no longer counts, and the store may hold a count with it.
            self._change(tenant, -sequences)
            self._dirty.add(tenant)
            raise

    def running(self, tenant: str) -> int:
        """Sequences this replica runs for `tenant` (store-admitted and fallback leases)."""
        return self._counts[tenant]

    # ---- admission -----------------------------------------------------------------------
    async def _admit_shared(
        self,
        tenant: str,
        policy: TenantPolicy,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int,
        count: int,
        version: int,
    ) -> Lease:
        cost = prompt_tokens + max_tokens
        rps, tpm = policy.requests_per_second, policy.tokens_per_minute
        started = time.perf_counter()
        try:
            verdict, wait_ms = await self._admit(
                keys=self._keys(tenant, "run", "alive", "requests", "tokens"),
                args=[
                    self.replica,
                    self._alive_ms,
                    self._keep_ms,
                    count,
                    version,
                    -1 if policy.max_concurrent is None else policy.max_concurrent,
                    float(policy.bucket_size or 0),
                    repr(0.0 if rps is None else rps / 1000.0),
                    repr(0.0 if tpm is None else float(tpm)),
                    repr(0.0 if tpm is None else tpm / 60000.0),
                    cost,
                ],
            )
        except STORE_ERRORS as exc:
            self._failed("admit", exc)
            return self._fallback(tenant, policy, prompt_tokens, max_tokens, sequences)
        self._failures = 0
        LIMIT_STORE_ADMISSION_DURATION.observe(time.perf_counter() - started)
        refusal = REFUSALS.get(int(verdict))
        wait = int(wait_ms) / 1000.0
        if refusal == "max_concurrent":
            refuse_concurrent(tenant, policy)
        if refusal == "requests":
            refuse_requests(tenant, policy, wait)
        if refusal == "tokens":
            refuse_tokens(tenant, policy, cost, wait)
        lease = SharedLease(self, tenant, max_tokens, sequences)
        if tpm is not None:
            lease.charged_tokens = cost
        return lease

    def _fallback(
        self, tenant: str, policy: TenantPolicy, prompt_tokens: int, max_tokens: int, sequences: int
    ) -> Lease:
        """This process's own buckets; its concurrency is every sequence this replica runs for
        the tenant, those the store admitted included (counted already, this request too)."""
        limit = policy.max_concurrent
        if limit is not None and self._counts[tenant] > limit:
            refuse_concurrent(tenant, policy)
        local = self._local.admit(
            tenant,
            dataclasses.replace(policy, max_concurrent=None),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            sequences=sequences,
        )
        LIMIT_STORE_FALLBACKS.inc()
        return FallbackLease(self, tenant, max_tokens, sequences, local=local)

    # ---- release and renewal -------------------------------------------------------------
    def _release(self, lease: Lease, completion_tokens: int, *, ran: bool) -> None:
        if isinstance(lease, FallbackLease):
            if lease.local is not None:
                lease.local.release(completion_tokens, ran=ran)
        elif isinstance(lease, SharedLease):
            refund = lease.charged_tokens
            if ran:
                refund = min(refund, lease.reserved_completion_tokens - completion_tokens)
            if refund > 0:
                self._refunds[lease.tenant] += refund
        else:
            return  # an unlimited tenant's: nothing was counted
        self._change(lease.tenant, -lease.sequences)
        self._dirty.add(lease.tenant)
        if self._up and self._flushing is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to write from: the next renewal does
                return
            # A request's last step must not wait on the store; one flush at a time writes
            # every count released meanwhile in one pipeline.
            self._flushing = loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty and self._up:
                error = await self._write(set(self._dirty))
                if error is not None:
                    self._failed("release", error)
                    return  # the renewal retries
        finally:
            self._flushing = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_s)
            try:
                if not self._up:
                    await self._writer.ping()
                await self.renew_once()
                self._set_up(True)
            except STORE_ERRORS as exc:
                self._failed("renew", exc)
            except Exception:  # never let the loop die: counts would stop being renewed
                logger.exception("renewing this replica's counts in the limits store failed")

    async def renew_once(self) -> None:
        """Write this replica's count and deadline for every tenant it runs sequences of, and
        for those whose newest count or owed tokens may not have reached the store."""
        error = await self._write(set(self._counts) | self._dirty)
        if error is not None:
            raise error

    async def _write(self, tenants: Iterable[str]) -> BaseException | None:
        """Each tenant's count as it is now, with the version it is now, and the tokens owed
        to it, in one pipeline; the store's error, if it failed. Then the counts stay dirty
        for the next write, and so do the tokens unless the store may have applied them (a
        timeout): a refund is given at most once."""
        snapshot = [
            (tenant, self._counts.get(tenant, 0), self._refunds.pop(tenant, 0))
            for tenant in list(tenants)
        ]
        if not snapshot:
            return None
        version = self._version
        self._dirty.difference_update(tenant for tenant, _, _ in snapshot)
        try:
            await self._send_reports(snapshot, version)
        except BaseException as exc:
            unknown = isinstance(exc, (asyncio.TimeoutError, TimeoutError, RedisTimeout))
            for tenant, _, refund in snapshot:
                self._dirty.add(tenant)
                if refund and not unknown:
                    self._refunds[tenant] += refund
            if not isinstance(exc, STORE_ERRORS):
                raise
            return exc
        return None

    async def _send_reports(self, snapshot: list[tuple[str, int, int]], version: int) -> None:
        # EVALSHA straight into the pipeline: redis-py's script objects would ask the store
        # whether the script exists before every pipeline, a round trip each time.
        for attempt in range(2):
            pipe = self._writer.pipeline(transaction=False)
            for tenant, count, refund in snapshot:
                keys = self._keys(tenant, "run", "alive", "tokens")
                args = (self.replica, self._alive_ms, self._keep_ms, count, version, refund)
                pipe.evalsha(self._report.sha, len(keys), *keys, *args)
            try:
                await pipe.execute()
                return
            except NoScriptError:  # the store restarted empty: every call failed alike
                if attempt:
                    raise
                await self._writer.script_load(REPORT)

    # ---- state ---------------------------------------------------------------------------
    def _change(self, tenant: str, sequences: int) -> None:
        self._counts[tenant] += sequences
        if self._counts[tenant] <= 0:
            del self._counts[tenant]
        self._version += 1

    def _failed(self, operation: str, error: BaseException) -> None:
        LIMIT_STORE_ERRORS.labels(operation).inc()
        self._failures += 1
        if operation == "renew" or self._failures >= FAILURES_TO_DOWN:
            self._set_up(False, error)

    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        if up:
            self._failures = 0
            if not self._up:
                logger.warning("limits store answers again: tenant limits are shared again")
        elif self._up:
            logger.error(
                "limits store unreachable (%s): each replica enforces tenant limits on its own "
                "until it answers",
                error.__class__.__name__ if error is not None else "unknown",
            )
        self._up = up
        LIMIT_STORE_UP.labels("redis").set(1 if up else 0)

    def _key(self, tenant: str, part: str) -> str:
        return f"{self._prefix}:limits:{{{tenant}}}:{part}"

    def _keys(self, tenant: str, *parts: str) -> list[str]:
        return [self._key(tenant, part) for part in parts]


def _client(
    url: str, connections: int, timeout_s: float
) -> tuple[redis.BlockingConnectionPool, redis.Redis]:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # a retry doubles the wait of every request in an outage
    )
    return pool, redis.Redis(connection_pool=pool)
