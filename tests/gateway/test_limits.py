"""Tenant limits as pure logic on a fake clock: what is admitted, what is refused, when it
recovers, what is refunded. The HTTP behaviour (429 + Retry-After) is tested in tests/e2e."""

from __future__ import annotations

import math

import pytest

from gateway.errors import InvalidRequest
from gateway.limits import MaxTokensAboveLimit, RateLimited, TenantLimiter, effective_max_tokens
from gateway.metrics import RATE_LIMITED
from registry.tenancy import TenantPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def admit(limiter: TenantLimiter, policy: TenantPolicy, tenant: str = "acme", prompt=10, out=10):
    return limiter.admit(tenant, policy, prompt_tokens=prompt, max_tokens=out)


def test_unlimited_policy_admits_everything(clock):
    limiter = TenantLimiter(clock)
    leases = [admit(limiter, TenantPolicy()) for _ in range(1000)]
    assert limiter.running("acme") == 1000
    for lease in leases:
        lease.release(5)
    assert limiter.running("acme") == 0


def test_requests_per_second_bucket_refuses_then_recovers(clock):
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(requests_per_second=2, burst=3)
    for _ in range(3):
        admit(limiter, policy).release()
    with pytest.raises(RateLimited) as info:
        admit(limiter, policy)
    assert info.value.limit == "requests_per_second" and info.value.status_code == 429
    assert info.value.error_type == "requests"
    assert info.value.headers() == {"Retry-After": "1"}  # 0.5 s rounds up to a whole second
    assert info.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    admit(limiter, policy).release()
    with pytest.raises(RateLimited):
        admit(limiter, policy)


def test_max_concurrent_counts_running_requests_not_rate(clock):
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(max_concurrent=2)
    first, _second = admit(limiter, policy), admit(limiter, policy)
    with pytest.raises(RateLimited) as info:
        admit(limiter, policy)
    assert info.value.limit == "max_concurrent"
    first.release()
    first.release()  # idempotent: a double release must not free a second slot
    admit(limiter, policy)
    with pytest.raises(RateLimited):
        admit(limiter, policy)


def test_tokens_per_minute_charges_prompt_plus_max_tokens_and_refunds_unused(clock):
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(tokens_per_minute=600)  # 10 tokens per second
    lease = admit(limiter, policy, prompt=100, out=400)  # reserves 500 of 600
    with pytest.raises(RateLimited) as info:
        admit(limiter, policy, prompt=50, out=100)
    assert info.value.limit == "tokens_per_minute" and info.value.error_type == "tokens"
    assert info.value.retry_after_s == pytest.approx(5.0)  # 50 missing at 10/s
    lease.release(completion_tokens=40)  # 360 unused come back
    admit(limiter, policy, prompt=50, out=100)


def test_a_request_larger_than_the_whole_token_budget_is_a_400_not_a_retry(clock):
    limiter = TenantLimiter(clock)
    with pytest.raises(InvalidRequest) as info:
        admit(limiter, TenantPolicy(tokens_per_minute=100), prompt=50, out=100)
    assert info.value.status_code == 400 and info.value.code == "tokens_per_minute_exceeded"


def test_refusal_charges_nothing(clock):
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(requests_per_second=1, burst=2, tokens_per_minute=60)
    admit(limiter, policy, prompt=30, out=20).release(20)  # 50 of 60 tokens spent, 1 request
    with pytest.raises(RateLimited):
        admit(limiter, policy, prompt=20, out=0)  # tokens refused...
    admit(limiter, policy, prompt=5, out=5)  # ...and its request token was given back


def test_tenants_do_not_share_buckets(clock):
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(requests_per_second=1)
    admit(limiter, policy, tenant="a")
    with pytest.raises(RateLimited):
        admit(limiter, policy, tenant="a")
    admit(limiter, policy, tenant="b")


def test_policy_edits_apply_on_the_next_request(clock):
    limiter = TenantLimiter(clock)
    admit(limiter, TenantPolicy(max_concurrent=1))
    with pytest.raises(RateLimited):
        admit(limiter, TenantPolicy(max_concurrent=1))
    admit(limiter, TenantPolicy(max_concurrent=2))  # raised by an admin
    loose = TenantPolicy(requests_per_second=100)
    for _ in range(100):
        admit(limiter, loose)
    tight = TenantPolicy(requests_per_second=1)  # tightened: no leftover burst carried over
    with pytest.raises(RateLimited):
        admit(limiter, tight)


def test_a_raised_token_budget_fills_at_its_new_rate(clock):
    limiter = TenantLimiter(clock)
    admit(limiter, TenantPolicy(tokens_per_minute=300), prompt=2, out=200).release(200)
    with pytest.raises(RateLimited):
        admit(limiter, TenantPolicy(tokens_per_minute=300), prompt=2, out=200)
    with pytest.raises(RateLimited):  # no extra allowance granted at once
        admit(limiter, TenantPolicy(tokens_per_minute=100_000), prompt=2, out=200)
    clock.now += 0.2  # 100 000 a minute: 333 more
    admit(limiter, TenantPolicy(tokens_per_minute=100_000), prompt=2, out=200)


def test_alternating_policies_never_refill_the_bucket(clock):
    """Two cached policies alternating (a replica a poll behind) refilled the bucket by the
    raise on every switch: 11 000 tokens admitted at once under 2 000 a minute (review)."""
    limiter = TenantLimiter(clock)
    admitted = 0
    for i in range(20):
        policy = TenantPolicy(tokens_per_minute=1000 if i % 2 else 2000)
        try:
            admit(limiter, policy, prompt=0, out=500)
        except RateLimited:
            continue
        admitted += 500
    assert admitted <= 2000


def test_max_concurrent_counts_sequences_not_requests(clock):
    """One request of 64 prompts x n 16 ran 1024 sequences under max_concurrent 1 (review)."""
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(max_concurrent=4)
    with pytest.raises(InvalidRequest) as never:
        limiter.admit("acme", policy, prompt_tokens=1, max_tokens=5, sequences=5)
    assert never.value.status_code == 400 and never.value.code == "max_concurrent_exceeded"
    three = limiter.admit("acme", policy, prompt_tokens=1, max_tokens=3, sequences=3)
    with pytest.raises(RateLimited):
        limiter.admit("acme", policy, prompt_tokens=1, max_tokens=2, sequences=2)
    one = limiter.admit("acme", policy, prompt_tokens=1, max_tokens=1, sequences=1)
    three.release(3)
    assert limiter.running("acme") == 1
    one.release(1)
    assert limiter.running("acme") == 0


def test_a_request_whose_client_got_nothing_is_refunded_its_tokens(clock):
    """A 503 while the engine is down (or an adapter that failed to load) cost the prompt:
    clients retrying drained their token budget on the outage (review). The request itself
    stays charged: refunding it let a client loop on refused requests past the rate."""
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(requests_per_second=1, tokens_per_minute=600)
    admit(limiter, policy, prompt=100, out=100).release(0, ran=False)
    assert limiter._tenants["acme"].tokens.level == 600
    with pytest.raises(RateLimited) as refused:
        admit(limiter, policy, prompt=100, out=100)
    assert refused.value.limit == "requests_per_second"
    clock.now += 1
    admit(limiter, policy, prompt=100, out=100).release(0)  # ran, produced nothing
    assert limiter._tenants["acme"].tokens.level == pytest.approx(500, abs=10)


def test_a_refund_never_exceeds_the_charge(clock):
    """A request admitted before a tokens-per-minute limit existed refunded its whole
    max_tokens into the new bucket (review)."""
    limiter = TenantLimiter(clock)
    uncharged = admit(limiter, TenantPolicy(), prompt=10, out=900)
    admit(limiter, TenantPolicy(tokens_per_minute=1000), prompt=0, out=900).release(900)
    uncharged.release(0)
    assert limiter._tenants["acme"].tokens.level == 100


def test_retry_after_is_a_bounded_whole_number_of_seconds():
    for wait in (0.2, 1e300, math.inf):
        error = RateLimited(
            "x", limit="requests_per_second", error_type="requests", retry_after_s=wait
        )
        header = error.headers()["Retry-After"]
        assert header.isdigit() and 1 <= int(header) <= 86400


def test_max_tokens_cap(clock):
    policy = TenantPolicy(max_tokens=64)
    assert effective_max_tokens("acme", policy, None, room=1000) == 64  # the cap is the default
    assert effective_max_tokens("acme", policy, None, room=10) == 10
    assert effective_max_tokens("acme", policy, 64, room=1000) == 64
    with pytest.raises(MaxTokensAboveLimit) as info:
        effective_max_tokens("acme", policy, 65, room=1000)
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    assert effective_max_tokens("acme", TenantPolicy(), None, room=1000) == 1000


def test_a_left_out_max_tokens_fits_the_tokens_per_minute_limit(clock):
    """The default was the whole context: 8 prompt + 2040 refused as over a 1000-token limit,
    "lower max_tokens", to a client that sent none (review)."""
    limiter = TenantLimiter(clock)
    policy = TenantPolicy(tokens_per_minute=1000)
    default = effective_max_tokens("acme", policy, None, room=2040, prompt_tokens=8)
    assert default == 992
    assert admit(limiter, policy, prompt=8, out=default)  # admitted, not a 400
    two = effective_max_tokens("acme", policy, None, room=2040, prompt_tokens=16, sequences=2)
    assert two == (1000 - 16) // 2
    capped = TenantPolicy(tokens_per_minute=1000, max_tokens=64)
    assert effective_max_tokens("acme", capped, None, room=2040, prompt_tokens=8) == 64
    assert effective_max_tokens("acme", policy, 1500, room=2040, prompt_tokens=8) == 1500
    # A prompt over the whole limit keeps the plain default: admission explains the refusal.
    assert effective_max_tokens("acme", policy, None, room=2040, prompt_tokens=1200) == 2040


def test_refusals_are_counted_per_tenant_and_limit(clock):
    limiter = TenantLimiter(clock)
    counter = RATE_LIMITED.labels("metered", "max_concurrent")
    before = counter._value.get()
    admit(limiter, TenantPolicy(max_concurrent=1), tenant="metered")
    for _ in range(3):
        with pytest.raises(RateLimited):
            admit(limiter, TenantPolicy(max_concurrent=1), tenant="metered")
    assert counter._value.get() == before + 3


def test_a_max_tokens_refusal_is_counted_as_limit_max_tokens(clock):
    """loraplex_rate_limited documents limit="max_tokens": a request above the key's cap
    counts there, like every other limit's refusal (review)."""
    counter = RATE_LIMITED.labels("capped", "max_tokens")
    before = counter._value.get()
    assert effective_max_tokens("capped", TenantPolicy(max_tokens=64), 64, room=1000)
    assert counter._value.get() == before  # at the cap: no refusal
    with pytest.raises(MaxTokensAboveLimit):
        effective_max_tokens("capped", TenantPolicy(max_tokens=64), 65, room=1000)
    assert counter._value.get() == before + 1
