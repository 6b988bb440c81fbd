"""API keys: issue (the plaintext is returned once and never stored), authenticate, revoke.

Authentication answers with one exception type whatever went wrong; its `reason` is for logs and
metrics. The secret is compared only after the key id is found, and a wrong secret reads like an
unknown key. Neither the secret nor its hash ever reaches the audit log.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import ApiKeyNotFound, InvalidApiKey, InvalidInput, RegistryConflict
from registry.models import ApiKey, utcnow
from registry.service.audit import record
from registry.service.tenants import get_tenant
from registry.tenancy import (
    CHOSEN_KEY_MAX_CHARS,
    CHOSEN_KEY_MIN_CHARS,
    TenantPolicy,
    generate_api_key,
    hash_secret,
    key_id_for,
    parse_presented_key,
)

MAX_LABEL_CHARS = 200
# A century: beyond it an expiry means "never" (omit it).
MAX_KEY_DAYS = 36500
MAX_REASON_CHARS = 500
# Compared against when the key id is unknown, so both paths hash and compare once.
_NO_SUCH_DIGEST = "0" * 64


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    plaintext: str = field(repr=False)  # shown to the admin once; keep it out of reprs and logs


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant behind a verified key, and the policy to enforce."""

    tenant: str
    tenant_id: int
    key_id: str
    policy: TenantPolicy
    expires_at: datetime | None


async def create_api_key(
    session: AsyncSession,
    *,
    tenant: str,
    actor: str,
    label: str | None = None,
    expires_at: datetime | None = None,
    plaintext: str | None = None,
) -> IssuedKey:
    """Issue a key for `tenant` (random, or `plaintext` when an operator chose it). Raises
    TenantNotFound, or InvalidInput for an expiry that is naive or not in the future, a label
    over 200 characters, or an unacceptable chosen key."""
    owner = await get_tenant(session, name=tenant)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidInput("expires_at must carry a time zone (e.g. 2027-01-01T00:00:00Z)")
        try:
            # Stored in UTC: 9999-12-31T23:00-05:00 lies past what a date can hold.
            expires_at = expires_at.astimezone(UTC)
        except OverflowError:
            raise InvalidInput(f"expires_at {expires_at.isoformat()} is out of range") from None
        now = utcnow()
        if expires_at <= now:
            raise InvalidInput(f"expires_at {expires_at.isoformat()} is not in the future")
        if expires_at > now + timedelta(days=MAX_KEY_DAYS):
            raise InvalidInput(
                f"expires_at {expires_at.isoformat()} is more than {MAX_KEY_DAYS} days away; "
                "omit it for a key that does not expire"
            )
    if label is not None and len(label) > MAX_LABEL_CHARS:
        raise InvalidInput(f"label is longer than {MAX_LABEL_CHARS} characters")
    if plaintext is None:
        plaintext, key_id, digest = generate_api_key()
    else:
        parts = parse_presented_key(plaintext)
        if parts is None:
            raise InvalidInput(
                f"a chosen key must be {CHOSEN_KEY_MIN_CHARS}-{CHOSEN_KEY_MAX_CHARS} characters "
                "of A-Z a-z 0-9 . _ ~ + / = -"
            )
        key_id, digest = parts[0], hash_secret(parts[1])
    key = ApiKey(
        tenant=owner,
        key_id=key_id,
        secret_sha256=digest,
        label=label,
        created_by=actor[:200],
        expires_at=expires_at,
    )
    session.add(key)
    record(
        session,
        actor=actor,
        action="key.create",
        target=f"tenant:{owner.name}",
        details={
            "key_id": key_id,
            "label": label,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    try:
        await session.commit()
    except IntegrityError:  # a 60-bit key id collided: practically never; the caller may retry
        await session.rollback()
        raise RegistryConflict("could not allocate a unique key id; retry") from None
    return IssuedKey(key=key, plaintext=plaintext)


async def authenticate_api_key(
    session: AsyncSession, *, presented: str, now: datetime | None = None
) -> Principal:
    """The principal behind `presented`, or InvalidApiKey (reason: malformed, unknown, revoked
    or expired; only a caller holding the right secret learns revoked/expired, and only in
    logs). Read-only."""
    parsed = parse_presented_key(presented)
    if parsed is None:
        raise InvalidApiKey("malformed")
    key_id, secret = parsed
    row = await session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    expected = row.secret_sha256 if row is not None else _NO_SUCH_DIGEST
    if not hmac.compare_digest(hash_secret(secret), expected) or row is None:
        raise InvalidApiKey("unknown", key_id=key_id)
    if row.revoked_at is not None:
        raise InvalidApiKey("revoked", key_id=key_id)
    if row.expires_at is not None and row.expires_at <= (now or utcnow()):
        raise InvalidApiKey("expired", key_id=key_id)
    return Principal(
        tenant=row.tenant.name,
        tenant_id=row.tenant_id,
        key_id=row.key_id,
        policy=TenantPolicy.from_stored(row.tenant.limits),
        expires_at=row.expires_at,
    )


async def revoke_api_key(
    session: AsyncSession, *, key_id: str, actor: str, reason: str | None = None
) -> ApiKey:
    """Revoke a key for good. Idempotent: a second call changes nothing (the first revoked_at
    and reason stay) and writes no audit row. Raises ApiKeyNotFound."""
    resolved = key_id_for(key_id)  # a whole key names its id; never echo the secret part
    if resolved is None:
        raise ApiKeyNotFound("no API key has that id")
    query = select(ApiKey).where(ApiKey.key_id == resolved).with_for_update(of=ApiKey)
    row = await session.scalar(query)
    if row is None:
        shown = f"{resolved!r}" if resolved == key_id else "for the key given"
        raise ApiKeyNotFound(f"API key {shown} does not exist")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        row.revoked_reason = reason[:MAX_REASON_CHARS] if reason else None
        record(
            session,
            actor=actor,
            action="key.revoke",
            target=f"tenant:{row.tenant.name}",
            details={"key_id": resolved, "reason": row.revoked_reason},
        )
    await session.commit()  # also ends the row lock on the idempotent path
    return row


async def list_api_keys(session: AsyncSession, *, tenant: str | None = None) -> list[ApiKey]:
    """All keys (revoked and expired included), oldest first; raises TenantNotFound for an
    unknown `tenant`."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        owner = await get_tenant(session, name=tenant)
        query = query.where(ApiKey.tenant_id == owner.id)
    return list((await session.scalars(query)).all())
