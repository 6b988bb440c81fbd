"""API keys and tenant policies through the service, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from registry import service
from registry.errors import (
    ApiKeyNotFound,
    InvalidApiKey,
    InvalidInput,
    InvalidPolicy,
    TenantNotFound,
)
from registry.models import ApiKey, AuditEntry, Tenant
from registry.tenancy import TenantPolicy, hash_secret, parse_api_key


@pytest.fixture
async def tenants(session: AsyncSession) -> AsyncSession:
    await service.create_tenant(session, name="acme", actor="root")
    await service.create_tenant(
        session, name="globex", actor="root", policy={"max_tokens": 256, "allow_base_model": False}
    )
    return session


async def reason_for(session: AsyncSession, presented: Any, **kw: Any) -> str:
    with pytest.raises(InvalidApiKey) as refused:
        await service.authenticate_api_key(session, presented=presented, **kw)
    return refused.value.reason


async def all_audit_json(session: AsyncSession) -> str:
    rows = (await session.scalars(select(AuditEntry))).all()
    return json.dumps([[r.actor, r.action, r.target, r.details] for r in rows], ensure_ascii=False)


async def test_issue_then_authenticate(tenants: AsyncSession):
    issued = await service.create_api_key(
        tenants, tenant="globex", actor="admin@globex", label="ci runner"
    )
    assert issued.plaintext.startswith("lpx_" + issued.key.key_id + "_")
    assert issued.plaintext not in repr(issued)
    assert (issued.key.label, issued.key.created_by, issued.key.tenant.name) == (
        "ci runner",
        "admin@globex",
        "globex",
    )
    principal = await service.authenticate_api_key(tenants, presented=issued.plaintext)
    assert principal.tenant == "globex" and principal.key_id == issued.key.key_id
    assert principal.tenant_id == issued.key.tenant_id and principal.expires_at is None
    assert principal.policy == TenantPolicy(max_tokens=256, allow_base_model=False)


async def test_only_the_secret_hash_is_stored(tenants: AsyncSession):
    issued = await service.create_api_key(tenants, tenant="acme", actor="root")
    parsed = parse_api_key(issued.plaintext)
    assert parsed is not None
    row = await tenants.scalar(select(ApiKey).where(ApiKey.key_id == issued.key.key_id))
    assert row is not None and row.secret_sha256 == hash_secret(parsed[1])
    assert parsed[1] not in row.secret_sha256


async def test_a_wrong_secret_reads_like_an_unknown_key(tenants: AsyncSession):
    issued = await service.create_api_key(tenants, tenant="acme", actor="root")
    last = issued.plaintext[-1]
    tampered = issued.plaintext[:-1] + ("B" if last != "B" else "C")
    unknown_id = "lpx_" + "a" * 12 + issued.plaintext[16:]
    assert unknown_id != issued.plaintext
    with pytest.raises(InvalidApiKey) as wrong:
        await service.authenticate_api_key(tenants, presented=tampered)
    with pytest.raises(InvalidApiKey) as missing:
        await service.authenticate_api_key(tenants, presented=unknown_id)
    assert wrong.value.reason == missing.value.reason == "unknown"
    assert str(wrong.value) == str(missing.value)
    assert wrong.value.key_id == issued.key.key_id


@pytest.mark.parametrize(
    "presented",
    ["", "x" * 1_000_000, "sk a" * 20, "lpx_ÄÖÜabcdefgh_" + "A" * 43, "Bearer lpx_", "short"],
    ids=["empty", "huge", "space", "unicode", "header-not-stripped", "too-short"],
)
async def test_malformed_keys(tenants: AsyncSession, presented: str):
    with pytest.raises(InvalidApiKey) as refused:
        await service.authenticate_api_key(tenants, presented=presented)
    assert (refused.value.reason, refused.value.key_id) == ("malformed", None)
    assert refused.value.code == "invalid_api_key"


async def test_every_failure_has_the_same_message(tenants: AsyncSession):
    revoked = await service.create_api_key(tenants, tenant="acme", actor="root")
    await service.revoke_api_key(tenants, key_id=revoked.key.key_id, actor="root")
    messages = set()
    for presented in ("", "lpx_" + "a" * 12 + "_" + "A" * 43, revoked.plaintext):
        with pytest.raises(InvalidApiKey) as refused:
            await service.authenticate_api_key(tenants, presented=presented)
        messages.add(str(refused.value))
    assert len(messages) == 1
    assert "revoked" not in messages.pop()


async def test_revoked_keys_stop_working_and_revoking_is_idempotent(tenants: AsyncSession):
    issued = await service.create_api_key(tenants, tenant="acme", actor="root")
    other = await service.create_api_key(tenants, tenant="acme", actor="root")
    first = await service.revoke_api_key(
        tenants, key_id=issued.key.key_id, actor="sec@acme", reason="leaked in a gist"
    )
    assert first.revoked_at is not None and first.revoked_reason == "leaked in a gist"
    assert await reason_for(tenants, issued.plaintext) == "revoked"
    again = await service.revoke_api_key(
        tenants, key_id=issued.key.key_id, actor="someone-else", reason="again"
    )
    assert (again.revoked_at, again.revoked_reason) == (first.revoked_at, "leaked in a gist")
    revocations = await service.list_audit(tenants, action="key.revoke")
    assert len(revocations) == 1
    assert revocations[0].details == {"key_id": issued.key.key_id, "reason": "leaked in a gist"}
    assert revocations[0].actor == "sec@acme" and revocations[0].target == "tenant:acme"
    # The tenant's other key is unaffected.
    assert (await service.authenticate_api_key(tenants, presented=other.plaintext)).tenant == "acme"


async def test_revoking_an_unknown_key(tenants: AsyncSession):
    with pytest.raises(ApiKeyNotFound) as missing:
        await service.revoke_api_key(tenants, key_id="nosuchkey234", actor="root")
    assert missing.value.code == "api_key_not_found"


async def test_expired_keys(tenants: AsyncSession):
    expires = datetime.now(UTC) + timedelta(hours=1)
    issued = await service.create_api_key(tenants, tenant="acme", actor="root", expires_at=expires)
    principal = await service.authenticate_api_key(tenants, presented=issued.plaintext)
    assert principal.expires_at == expires
    later = expires + timedelta(seconds=1)
    assert await reason_for(tenants, issued.plaintext, now=later) == "expired"
    assert await reason_for(tenants, issued.plaintext, now=expires) == "expired"  # boundary
    before = expires - timedelta(seconds=1)
    assert await service.authenticate_api_key(tenants, presented=issued.plaintext, now=before)


async def test_a_revoked_and_expired_key_reads_revoked(tenants: AsyncSession):
    issued = await service.create_api_key(
        tenants, tenant="acme", actor="root", expires_at=datetime.now(UTC) + timedelta(minutes=5)
    )
    await service.revoke_api_key(tenants, key_id=issued.key.key_id, actor="root")
    far = datetime.now(UTC) + timedelta(days=1)
    assert await reason_for(tenants, issued.plaintext, now=far) == "revoked"


@pytest.mark.parametrize(
    "expires_at",
    [
        datetime.now(UTC) - timedelta(seconds=1),
        datetime(2030, 1, 1),  # naive
        # UTC of it is past what a date holds: was a 500 (OverflowError) on storing (review)
        datetime.fromisoformat("9999-12-31T23:00:00-05:00"),
        datetime.now(UTC) + timedelta(days=36501),  # beyond a century: omit it instead
    ],
    ids=["past", "naive", "past-datetime-max-in-utc", "beyond-a-century"],
)
async def test_expiry_must_be_aware_and_in_the_future(tenants: AsyncSession, expires_at):
    with pytest.raises(InvalidInput):
        await service.create_api_key(tenants, tenant="acme", actor="root", expires_at=expires_at)
    assert await service.list_api_keys(tenants) == []


async def test_overlong_labels_are_refused(tenants: AsyncSession):
    with pytest.raises(InvalidInput):
        await service.create_api_key(tenants, tenant="acme", actor="root", label="x" * 201)


async def test_keys_for_an_unknown_tenant(tenants: AsyncSession):
    with pytest.raises(TenantNotFound):
        await service.create_api_key(tenants, tenant="initech", actor="root")
    with pytest.raises(TenantNotFound):
        await service.list_api_keys(tenants, tenant="initech")
    assert await service.list_api_keys(tenants) == []


async def test_list_keys_in_creation_order(tenants: AsyncSession):
    made = [
        await service.create_api_key(tenants, tenant=t, actor="root", label=f"k{i}")
        for i, t in enumerate(["acme", "globex", "acme"])
    ]
    everyone = await service.list_api_keys(tenants)
    assert [k.key_id for k in everyone] == [m.key.key_id for m in made]
    acme = await service.list_api_keys(tenants, tenant="acme")
    assert [k.label for k in acme] == ["k0", "k2"]


async def test_the_audit_log_never_holds_a_secret(tenants: AsyncSession):
    expires = datetime.now(UTC) + timedelta(days=30)
    issued = await service.create_api_key(
        tenants, tenant="acme", actor="root", label="prod", expires_at=expires
    )
    await service.revoke_api_key(tenants, key_id=issued.key.key_id, actor="root", reason="rotate")
    parsed = parse_api_key(issued.plaintext)
    assert parsed is not None
    secret = parsed[1]
    dump = await all_audit_json(tenants)
    for forbidden in (issued.plaintext, secret, hash_secret(secret), issued.key.secret_sha256):
        assert forbidden not in dump
    created = (await service.list_audit(tenants, action="key.create"))[0]
    assert created.target == "tenant:acme"
    assert created.details == {
        "key_id": issued.key.key_id,
        "label": "prod",
        "expires_at": expires.isoformat(),
    }


async def test_policy_updates_are_validated_stored_and_audited(tenants: AsyncSession):
    policy = {"requests_per_second": 5, "tokens_per_minute": 10_000, "max_concurrent": 2}
    row = await service.update_tenant_policy(tenants, tenant="acme", policy=policy, actor="ops")
    assert row.limits == {**policy, "requests_per_second": 5.0, "allow_base_model": True}
    issued = await service.create_api_key(tenants, tenant="acme", actor="root")
    principal = await service.authenticate_api_key(tenants, presented=issued.plaintext)
    assert principal.policy == TenantPolicy(
        requests_per_second=5.0, tokens_per_minute=10_000, max_concurrent=2
    )
    entry = (await service.list_audit(tenants, action="tenant.policy"))[0]
    assert (entry.actor, entry.target) == ("ops", "tenant:acme")
    assert entry.details == {"policy": row.limits}

    with pytest.raises(InvalidPolicy) as refused:
        await service.update_tenant_policy(
            tenants, tenant="acme", policy={"max_tokens": 0, "nope": 1}, actor="ops"
        )
    assert len(refused.value.problems) == 2
    async with AsyncSession(tenants.bind, expire_on_commit=False) as fresh:
        stored = await fresh.scalar(select(Tenant.limits).where(Tenant.name == "acme"))
    assert stored == row.limits  # the refused update changed nothing
    with pytest.raises(TenantNotFound):
        await service.update_tenant_policy(tenants, tenant="initech", policy={}, actor="ops")
    # Replacing with {} lifts every limit.
    cleared = await service.update_tenant_policy(tenants, tenant="acme", policy={}, actor="ops")
    assert TenantPolicy.from_stored(cleared.limits) == TenantPolicy()


async def test_create_tenant_validates_its_policy(tenants: AsyncSession):
    with pytest.raises(InvalidPolicy):
        await service.create_tenant(tenants, name="initech", actor="root", policy={"burst": True})
    with pytest.raises(TenantNotFound):
        await service.get_tenant(tenants, name="initech")
    globex = await service.get_tenant(tenants, name="globex")
    assert globex.limits == {"max_tokens": 256, "allow_base_model": False}
    acme = await service.get_tenant(tenants, name="acme")
    assert acme.limits is None
    created = await service.list_audit(tenants, target="tenant:globex")
    assert created[0].details == {"policy": globex.limits}


async def test_an_operator_chosen_key_works_like_a_generated_one(tenants: AsyncSession):
    chosen = "demo-key-chosen-by-the-operator-42"
    issued = await service.create_api_key(
        tenants, tenant="acme", actor="root", label="demo", plaintext=chosen
    )
    assert issued.plaintext == chosen and chosen not in issued.key.secret_sha256
    principal = await service.authenticate_api_key(tenants, presented=chosen)
    assert principal.tenant == "acme" and principal.key_id == issued.key.key_id
    with pytest.raises(InvalidApiKey) as other:
        await service.authenticate_api_key(tenants, presented=chosen + "x")
    assert other.value.reason == "unknown"  # well-formed, just not registered
    with pytest.raises(InvalidInput):
        await service.create_api_key(tenants, tenant="acme", actor="root", plaintext="short")


@pytest.mark.parametrize("chosen", [False, True])
async def test_revoking_by_the_whole_key_revokes_it_and_never_repeats_the_secret(
    tenants: AsyncSession, chosen: bool
):
    """An operator pastes a leaked key instead of its id: it is revoked, and neither the
    error for an unknown one nor the audit row holds the secret."""
    plaintext = "leaked-chosen-key-0123456789" if chosen else None
    issued = await service.create_api_key(tenants, tenant="acme", actor="root", plaintext=plaintext)
    row = await service.revoke_api_key(tenants, key_id=issued.plaintext, actor="root")
    assert row.key_id == issued.key.key_id and row.revoked_at is not None
    assert await reason_for(tenants, issued.plaintext) == "revoked"
    (audit,) = await service.list_audit(tenants, action="key.revoke")
    assert audit.details["key_id"] == issued.key.key_id
    assert issued.plaintext not in str(audit.details)
    unknown = "another-leaked-key-not-issued" if chosen else "lpx_" + "b" * 12 + "_" + "C" * 43
    for given in (unknown, "x" * 300):
        with pytest.raises(ApiKeyNotFound) as missing:
            await service.revoke_api_key(tenants, key_id=given, actor="root")
        assert given[:12] not in str(missing.value)
