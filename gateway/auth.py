"""Tenant authentication for /v1: `Authorization: Bearer <key>` → the key's tenant and policy.

Keys live in the registry as hashes only. A verified key is cached (the same TTL as model
resolution) so the hot path makes no database round trip; revoking or editing limits through
this process's admin API clears the cache at once, other replicas follow within one poll of the
registry's change generation (gateway/registry_watch.py).
While the registry is unreachable, a key verified before keeps working past the cache lifetime
(bounded: gateway/registry_outage.py); an unknown key then gets 503 registry_unavailable.
Failures never say which part was wrong (unknown, revoked and expired read the same to the
client); the reason goes to the audit log and the auth-failures metric.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, NoReturn

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from gateway.audit_log import audit_event
from gateway.errors import EngineUnavailable, LoraplexError, RegistryUnavailable
from gateway.metrics import AUTH_FAILURES
from gateway.registry_outage import RegistryOutage
from gateway.registry_runtime import RegistryRuntime
from gateway.request_metrics import note_caller
from registry import service
from registry.errors import InvalidApiKey
from registry.service import Principal

MAX_KEY_CHARS = 256
# Bound the cache so a flood of distinct valid keys cannot grow memory without limit.
MAX_CACHED_KEYS = 10_000
# Where gateway.tenant_gate leaves the principal it verified, in the request's state.
PRINCIPAL_STATE = "tenant_principal"


class InvalidApiKeyError(LoraplexError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class _Cached:
    principal: Principal
    until: float


class KeyAuthenticator:
    def __init__(self, runtime: RegistryRuntime, cache_ttl_s: float):
        self._runtime = runtime
        self._ttl = cache_ttl_s
        self._cache: dict[bytes, _Cached] = {}
        self._outage = RegistryOutage("api keys", cache_ttl_s, runtime.sessions)
        # Bumped by invalidate(): a key verified before a revocation arrived is not cached
        # after it (the lookup awaits the registry in between).
        self._epoch = 0

    async def authenticate(self, presented: str, *, client: str | None) -> Principal:
        # Cache under a digest, so plaintext keys do not sit in a long-lived dict.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and _expired(hit.principal):
            hit = None  # its own expiry needs no registry to be judged
        if hit is not None and hit.until > now:
            return hit.principal
        stale = hit if hit is not None and self._outage.usable(hit.until, now) else None
        if stale is not None and self._outage.skip_registry(now):
            return stale.principal
        epoch = self._epoch
        try:
            async with self._runtime.sessions() as session:
                principal = await service.authenticate_api_key(session, presented=presented)
        except InvalidApiKey as exc:
            self._outage.answered()
            self._cache.pop(digest, None)
            fail(exc.reason, client=client, key_id=exc.key_id)
        except Exception as exc:
            if not self._outage.note_failure(exc):
                raise
            if stale is not None and epoch == self._epoch:  # not revoked meanwhile
                return stale.principal
            raise RegistryUnavailable() from exc
        self._outage.answered()
        if epoch == self._epoch:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = _Cached(principal, now + self._ttl)
        return principal

    async def close(self) -> None:
        """At shutdown, before the registry's engine is disposed (see RegistryOutage.close)."""
        await self._outage.close()

    @property
    def epoch(self) -> int:
        """Moves with every revocation or limit change seen (here or by the registry watch)."""
        return self._epoch

    def invalidate(self) -> None:
        self._epoch += 1
        self._cache.clear()


@dataclass(frozen=True)
class VerifiedAhead:
    """What gateway.tenant_gate leaves in the request's state: the principal, and the
    authenticator's epoch from before it was verified."""

    principal: Principal
    epoch: int


def _expired(principal: Principal) -> bool:
    return principal.expires_at is not None and principal.expires_at <= datetime.now(UTC)


def fail(reason: str, *, client: str | None, key_id: str | None = None) -> NoReturn:
    AUTH_FAILURES.labels(reason).inc()
    audit_event("auth.failure", reason=reason, key_id=key_id, client=client)
    raise InvalidApiKeyError(
        "Incorrect API key provided. You can find your API key with your gateway operator."
    )


async def authenticate_request(request: HTTPConnection) -> Principal:
    """The tenant of the request's bearer key, else the error its caller gets: 401 (the failure
    counted and audited), or 503 while the gateway starts or the registry cannot answer."""
    authenticator: KeyAuthenticator | None = getattr(request.app.state, "authenticator", None)
    if authenticator is None:
        raise EngineUnavailable("The gateway is starting; try again shortly.")
    client = request.client.host if request.client else None
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    supplied = supplied.strip()
    if not supplied:
        fail("missing", client=client)
    if scheme.lower() != "bearer" or len(supplied) > MAX_KEY_CHARS:
        fail("malformed", client=client)
    return await authenticator.authenticate(supplied, client=client)


async def authenticate_ahead(request: HTTPConnection) -> None:
    """Verify the request's key before its body is read (gateway.tenant_gate), for
    `require_tenant` to take up; raises as authenticate_request does."""
    authenticator: KeyAuthenticator | None = getattr(request.app.state, "authenticator", None)
    epoch = authenticator.epoch if authenticator is not None else -1
    principal = await authenticate_request(request)
    setattr(request.state, PRINCIPAL_STATE, VerifiedAhead(principal, epoch))


async def require_tenant(request: Request) -> Principal:
    # gateway.tenant_gate verified the key before the body was read. It still holds if nothing
    # was revoked or changed since (a body can take its time to arrive, and a key revoked
    # meanwhile was served before this check) and the key has not expired; else, and where the
    # gate did not run (GET /v1/models, an app or a test without the gate), verify it here.
    ahead: VerifiedAhead | None = getattr(request.state, PRINCIPAL_STATE, None)
    authenticator: KeyAuthenticator | None = getattr(request.app.state, "authenticator", None)
    if (
        ahead is not None
        and authenticator is not None
        and ahead.epoch == authenticator.epoch
        and not _expired(ahead.principal)
    ):
        principal = ahead.principal
    else:
        principal = await authenticate_request(request)
    note_caller(request.state, principal.tenant)
    return principal


TenantDep = Annotated[Principal, Depends(require_tenant)]
