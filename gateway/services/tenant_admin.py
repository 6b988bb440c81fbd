"""Admin operations on tenants, their API keys, limits and adapter shares.

Each write commits in the registry (with its audit row), then clears this process's caches so
the change holds from the very next request: a revoked key stops authenticating, new limits
apply, an unshared adapter stops resolving. Other replicas follow within one registry poll
(LORAPLEX_ROLLOUT_POLL_INTERVAL_S, gateway.registry_watch); the cache TTL only bounds an entry's
life should the registry stop answering. A stream already admitted runs to its end.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.audit_log import audit_event, registry_operation
from gateway.auth import KeyAuthenticator
from gateway.catalog import RegistryCatalog
from gateway.errors import InvalidRequest
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.models import ApiKey, Tenant
from registry.service import IssuedKey
from registry.tenancy import key_id_for


def key_status(key: ApiKey, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


class TenantAdmin:
    def __init__(
        self, runtime: RegistryRuntime, authenticator: KeyAuthenticator, catalog: RegistryCatalog
    ):
        self._runtime = runtime
        self._authenticator = authenticator
        self._catalog = catalog

    def _caches_changed(self) -> None:
        self._authenticator.invalidate()
        self._catalog.invalidate()

    async def create_tenant(self, name: str, limits: dict[str, Any] | None, actor: str) -> Tenant:
        async with (
            registry_operation("tenant_create", actor, tenant=name),
            self._runtime.sessions() as session,
        ):
            return await service.create_tenant(session, name=name, actor=actor, policy=limits)

    async def list_tenants(self) -> list[Tenant]:
        async with self._runtime.sessions() as session:
            return await service.list_tenants(session)

    async def get_tenant(self, name: str) -> Tenant:
        async with self._runtime.sessions() as session:
            return await service.get_tenant(session, name=name)

    async def update_limits(self, name: str, changes: dict[str, Any], actor: str) -> Tenant:
        """Merge: fields given replace the stored ones, a null clears one (unlimited)."""
        async with (
            registry_operation("limits_update", actor, tenant=name),
            self._runtime.sessions() as session,
        ):
            row = await service.change_tenant_policy(
                session, tenant=name, changes=changes, actor=actor
            )
        self._caches_changed()
        return row

    async def create_key(
        self,
        tenant: str,
        *,
        label: str | None,
        expires_at: datetime | None,
        expires_in_days: float | None,
        actor: str,
    ) -> IssuedKey:
        if expires_at is None and expires_in_days is not None:
            try:
                expires_at = datetime.now(UTC) + timedelta(days=expires_in_days)
            except OverflowError:  # the schema bounds it; a caller without the schema may not
                raise InvalidRequest(
                    f"expires_in_days {expires_in_days} is too far in the future",
                    param="expires_in_days",
                ) from None
        async with (
            registry_operation("key_create", actor, tenant=tenant),
            self._runtime.sessions() as session,
        ):
            issued = await service.create_api_key(
                session, tenant=tenant, actor=actor, label=label, expires_at=expires_at
            )
        audit_event("admin.key_issued", actor=actor, tenant=tenant, key_id=issued.key.key_id)
        return issued

    async def list_keys(self, tenant: str | None) -> list[ApiKey]:
        async with self._runtime.sessions() as session:
            if tenant is not None:
                await service.get_tenant(session, name=tenant)  # unknown tenant → 404
            return await service.list_api_keys(session, tenant=tenant)

    async def revoke_key(self, key_id: str, reason: str | None, actor: str) -> ApiKey:
        # The operation's log line names the id only, also when a whole key was given.
        logged = key_id_for(key_id) or "(not a key id)"
        async with (
            registry_operation("key_revoke", actor, key_id=logged),
            self._runtime.sessions() as session,
        ):
            row = await service.revoke_api_key(session, key_id=key_id, actor=actor, reason=reason)
        self._caches_changed()
        return row

    async def share(self, name: str, tenant: str, actor: str) -> list[str]:
        async with (
            registry_operation("share", actor, adapter=name, tenant=tenant),
            self._runtime.sessions() as session,
        ):
            await service.share_adapter(session, name=name, tenant=tenant, actor=actor)
            shares = await service.list_adapter_shares(session, name=name)
        self._catalog.invalidate()
        return shares

    async def unshare(self, name: str, tenant: str, actor: str) -> list[str]:
        async with (
            registry_operation("unshare", actor, adapter=name, tenant=tenant),
            self._runtime.sessions() as session,
        ):
            await service.unshare_adapter(session, name=name, tenant=tenant, actor=actor)
            shares = await service.list_adapter_shares(session, name=name)
        self._catalog.invalidate()
        return shares

    async def list_shares(self, name: str) -> list[str]:
        async with self._runtime.sessions() as session:
            await service.get_adapter(session, name=name)
            return await service.list_adapter_shares(session, name=name)
