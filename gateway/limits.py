"""Per-tenant admission limits: requests per second and tokens per minute (token buckets), max
concurrent sequences (a request counts its prompts x n) and a max_tokens cap, all read from
the tenant's policy in the registry.

State lives in this process. With several gateway replicas each enforces the full policy on its
own share of the traffic, so a tenant's effective ceiling is replicas x limit; put a sticky
load balancer in front (hash on the API key) to keep one tenant on one replica, or set the
policy to limit / replicas. README "Tenants, keys and limits" says the same.

Tokens are charged at admission as prompt + max_tokens (what the request may cost at most) and
the unused part of max_tokens is refunded when it finishes (every token, when the client got
none of its output), so a tenant can never overshoot its budget by starting many long
generations at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from gateway.errors import InvalidRequest, LoraplexError
from gateway.metrics import RATE_LIMITED
from registry.tenancy import TenantPolicy

# The longest wait Retry-After announces: a day, the slowest rate a policy may set.
MAX_RETRY_AFTER_S = 86400.0


class RateLimited(LoraplexError):
    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, error_type: str, retry_after_s: float):
        super().__init__(message)
        self.limit = limit
        self.error_type = error_type  # OpenAI says "requests" or "tokens" here
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        wait = self.retry_after_s if math.isfinite(self.retry_after_s) else MAX_RETRY_AFTER_S
        return {"Retry-After": str(max(1, math.ceil(min(wait, MAX_RETRY_AFTER_S))))}


class MaxTokensAboveLimit(InvalidRequest):
    """Asking for more than the cap is a request that can never succeed: 400, not 429, so
    clients fix it instead of retrying."""

    code = "max_tokens_above_tenant_limit"


def refuse_what_never_fits(
    tenant: str, policy: TenantPolicy, *, sequences: int, prompt_tokens: int, max_tokens: int
) -> None:
    """400 for a request no wait can admit: more sequences than max_concurrent, or more
    tokens than the whole tokens-per-minute budget (retrying cannot help, so not a 429)."""
    limit = policy.max_concurrent
    if limit is not None and sequences > limit:
        RATE_LIMITED.labels(tenant, "max_concurrent").inc()
        raise InvalidRequest(
            f"This request runs {sequences} sequences (prompts x n) at once, more than "
            f"this key's limit of {limit} concurrent sequences.",
            param="n",
            code="max_concurrent_exceeded",
        )
    budget, cost = policy.tokens_per_minute, prompt_tokens + max_tokens
    if budget is not None and cost > budget:
        RATE_LIMITED.labels(tenant, "tokens_per_minute").inc()
        raise InvalidRequest(
            f"This request needs up to {cost} tokens ({prompt_tokens} prompt + {max_tokens} "
            f"max_tokens), more than the tokens-per-minute limit of {int(budget)}; lower "
            "max_tokens.",
            param="max_tokens",
            code="tokens_per_minute_exceeded",
        )


def refuse_concurrent(tenant: str, policy: TenantPolicy) -> NoReturn:
    _refuse(
        tenant,
        "max_concurrent",
        "requests",
        f"Too many concurrent sequences: limit {policy.max_concurrent} (a request counts its "
        "prompts x n). Retry when one of your requests finishes.",
        1.0,
    )


def refuse_requests(tenant: str, policy: TenantPolicy, wait: float) -> NoReturn:
    _refuse(
        tenant,
        "requests_per_second",
        "requests",
        f"Rate limit reached on requests per second: limit {policy.requests_per_second:g}. "
        f"Please try again in {wait:.2f}s.",
        wait,
    )


def refuse_tokens(tenant: str, policy: TenantPolicy, cost: int, wait: float) -> NoReturn:
    _refuse(
        tenant,
        "tokens_per_minute",
        "tokens",
        f"Rate limit reached on tokens per minute: limit {policy.tokens_per_minute}, "
        f"requested {cost}. Please try again in {wait:.2f}s.",
        wait,
    )


def _refuse(tenant: str, limit: str, kind: str, message: str, wait: float) -> NoReturn:
    RATE_LIMITED.labels(tenant, limit).inc()
    raise RateLimited(message, limit=limit, error_type=kind, retry_after_s=wait)


def effective_max_tokens(
    tenant: str,
    policy: TenantPolicy,
    requested: int | None,
    room: int,
    *,
    prompt_tokens: int = 0,
    sequences: int = 1,
) -> int:
    """The completion budget: what the client asked for, else all the room left, never
    above the tenant's cap (a missing max_tokens means "up to the cap", not an error).
    Left out, it also fits the tokens-per-minute limit beside the prompt: the default
    was the whole context, which that limit then refused with "lower max_tokens" to a
    client that had sent none. Above the cap: refused, and counted as limit max_tokens."""
    cap = policy.max_tokens
    if requested is not None:
        if cap is not None and requested > cap:
            RATE_LIMITED.labels(tenant, "max_tokens").inc()
            raise MaxTokensAboveLimit(
                f"max_tokens {requested} is above this key's limit of {cap}.",
                param="max_tokens",
            )
        return requested
    default = room if cap is None else min(room, cap)
    if policy.tokens_per_minute is not None:
        per_sequence = (int(policy.tokens_per_minute) - prompt_tokens) // max(1, sequences)
        if per_sequence >= 1:  # else the prompt alone is over it: admit() says so
            default = min(default, per_sequence)
    return default


class AdmissionLimits(Protocol):
    """What the generation service asks of a tenant limiter: this process's own
    (TenantLimiter) or one shared by every replica (gateway.shared_limits)."""

    async def acquire(
        self,
        tenant: str,
        policy: TenantPolicy,
        *,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int = 1,
    ) -> Lease: ...


class LeaseOwner(Protocol):
    def _release(self, lease: Lease, completion_tokens: int, *, ran: bool) -> None: ...


@dataclass
class TokenBucket:
    capacity: float
    refill_per_s: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_s)
        self.updated = now

    def try_take(self, cost: float, now: float) -> float:
        """Take `cost` and return 0, or take nothing and return seconds until it would fit."""
        self.refill(now)
        if self.level >= cost:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.refill_per_s

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def reshape(self, capacity: float, refill_per_s: float) -> None:
        """A raised limit fills up at its new rate, a lowered one keeps no more than its new
        capacity. Granting a raise's extra at once let two cached policies, alternating on a
        replica whose cache was a poll behind, refill the bucket on every switch."""
        self.level = min(self.level, capacity)
        self.capacity, self.refill_per_s = capacity, refill_per_s


@dataclass
class _TenantState:
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    running: int = 0


@dataclass
class Lease:
    """One admitted request. `release` is idempotent: call it in every exit path."""

    limiter: LeaseOwner
    tenant: str
    reserved_completion_tokens: int
    sequences: int = 1  # concurrent slots held: prompts x n
    charged_tokens: int = 0  # what the tokens bucket gave (0: no such limit at admission)
    released: bool = field(default=False)

    def release(self, completion_tokens: int = 0, *, ran: bool = True) -> None:
        """`ran` False: the client got none of its output (the engine refused or failed it,
        the engine died, the adapter failed to load): every token charged is refunded, so
        clients retrying a 503 do not spend their token budget on an outage. The request
        counts against requests_per_second anyway."""
        if self.released:
            return
        self.released = True
        self.limiter._release(self, completion_tokens, ran=ran)


class TenantLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tenants: dict[str, _TenantState] = {}

    def admit(
        self,
        tenant: str,
        policy: TenantPolicy,
        *,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int = 1,
    ) -> Lease:
        """Admit one request of `sequences` generations (prompts x n) or raise RateLimited
        (nothing is charged on refusal). max_concurrent counts sequences: one request of 64
        prompts x n 16 ran 1024 of them under a limit of 1."""
        refuse_what_never_fits(
            tenant, policy, sequences=sequences, prompt_tokens=prompt_tokens, max_tokens=max_tokens
        )
        cost = prompt_tokens + max_tokens
        state = self._state(tenant, policy)
        now = self._clock()
        limit = policy.max_concurrent
        if limit is not None and state.running + sequences > limit:
            refuse_concurrent(tenant, policy)
        if state.requests is not None:
            wait = state.requests.try_take(1, now)
            if wait:
                refuse_requests(tenant, policy, wait)
        lease = Lease(self, tenant, max_tokens, sequences)
        if state.tokens is not None:
            wait = state.tokens.try_take(cost, now)
            if wait:
                if state.requests is not None:
                    state.requests.give_back(1)
                refuse_tokens(tenant, policy, cost, wait)
            lease.charged_tokens = cost
        state.running += sequences
        return lease

    async def acquire(
        self,
        tenant: str,
        policy: TenantPolicy,
        *,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int = 1,
    ) -> Lease:
        """`admit` as AdmissionLimits has it (the shared limiter asks its store)."""
        return self.admit(
            tenant, policy, prompt_tokens=prompt_tokens, max_tokens=max_tokens, sequences=sequences
        )

    def running(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return 0 if state is None else state.running

    def _release(self, lease: Lease, completion_tokens: int, *, ran: bool) -> None:
        state = self._tenants.get(lease.tenant)
        if state is None:
            return
        state.running = max(0, state.running - lease.sequences)
        # Never more than this lease was charged: a limit added while it ran charged nothing.
        # The request itself stays charged either way: refunding it let a client loop on
        # requests the engine refuses as fast as it liked, past requests_per_second.
        refund = lease.charged_tokens
        if ran:
            refund = min(refund, lease.reserved_completion_tokens - completion_tokens)
        if state.tokens is not None and refund > 0:
            state.tokens.give_back(refund)

    def _state(self, tenant: str, policy: TenantPolicy) -> _TenantState:
        """The tenant's buckets, reshaped to the current policy (edits apply on the next
        request; a tightened limit keeps no more than its new capacity)."""
        state = self._tenants.setdefault(tenant, _TenantState())
        now = self._clock()
        rps = policy.requests_per_second
        if rps is None:
            state.requests = None
        else:
            burst = float(policy.burst or max(1, math.ceil(rps)))
            state.requests = _shaped(state.requests, burst, rps, now)
        tpm = policy.tokens_per_minute
        if tpm is None:
            state.tokens = None
        else:
            state.tokens = _shaped(state.tokens, float(tpm), tpm / 60.0, now)
        return state


def _shaped(bucket: TokenBucket | None, capacity: float, rate: float, now: float) -> TokenBucket:
    if bucket is None:
        return TokenBucket(capacity, rate, capacity, now)
    if bucket.capacity != capacity or bucket.refill_per_s != rate:
        # The time since the bucket last filled counts at the new rate (the edit is seen only
        # by the next request); the level itself is not raised (see TokenBucket.reshape).
        bucket.reshape(capacity, rate)
        bucket.refill(now)
    return bucket
