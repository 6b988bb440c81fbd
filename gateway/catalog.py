"""Where servable models come from: the base plus adapters, resolved by the name clients send.

The gateway asks a ModelCatalog, never the file system, which adapter a `model` names. The
registry-backed catalog answers from the database, so a version registered through the admin API
is servable on the next request and a retired one is gone, without a restart. While the
registry is unreachable, names resolved before keep resolving past the cache lifetime (bounded:
gateway/registry_outage.py); anything else gets 503 registry_unavailable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from gateway.adapter_loads import AdapterLoadFailed
from gateway.engine.client import AdapterHandle
from gateway.errors import ModelNotFound, ModelUnavailable, RegistryUnavailable
from gateway.registry_outage import RegistryOutage
from gateway.registry_runtime import RegistryRuntime
from gateway.rollout_router import RolloutRouter
from registry import service
from registry.compat import AdapterArtifact, inspect_adapter, run_gate
from registry.compat.artifact import ARTIFACT_FILES
from registry.errors import InvalidName, NotFound
from registry.naming import parse_address
from registry.service import Principal, ResolvedAdapter
from registry.store.digest import Entry, tree_digest

logger = logging.getLogger(__name__)
# (tenant, name) pairs; bounded so probing many names cannot grow memory.
MAX_CACHED = 50_000
# Tenants whose whole scope (name → current version) is held; bounded the same way.
MAX_SCOPES = 1_000


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: the base (adapter None) or an adapter on it."""

    name: str
    adapter: AdapterHandle | None
    created: int
    parent: str | None = None
    owned_by: str = "loraplex"
    # The registry's adapter name and version ("" for the base): bounded metric labels.
    adapter_name: str = ""
    version: int | None = None
    owner: str = ""  # the tenant that owns the adapter ("" for the base)
    pinned: bool = False  # asked for as `name@N`, not routed by the name's rollout

    def judged_by(self, tenant: str) -> bool:
        """Whether `tenant`'s request is evidence for the version's rollout verdicts: only
        the owner's requests routed by the rollout (the base's: anyone's). A tenant an adapter
        is shared with chooses its own prompt lengths, max_tokens and pins: its requests
        would roll back, fall back or promote another tenant's versions."""
        return not self.pinned and self.owner in ("", tenant)

    @property
    def version_label(self) -> str:
        return "" if self.version is None else str(self.version)


class ModelCatalog(Protocol):
    async def list_models(self, caller: Principal) -> list[ServedModel]:
        """Exactly what `caller` may use."""
        ...

    async def resolve(self, name: str, caller: Principal, caller_key: str = "") -> ServedModel:
        """Raises ModelNotFound for anything `caller` may not use: unknown, another tenant's,
        retired or not servable all give the same answer. `caller_key` picks the caller's
        side of a canary (sticky)."""
        ...

    async def describe(self, name: str, caller: Principal) -> ServedModel:
        """`name` itself (no rollout routing), for its model card; the same refusals."""
        ...


class RegistryCatalog:
    """The served base plus every servable adapter version bound to it in the registry, as
    seen by one tenant: its own adapters, those shared with it, and globally shared ones."""

    def __init__(
        self,
        runtime: RegistryRuntime,
        cache_ttl_s: float = 1.0,
        router: RolloutRouter | None = None,
    ):
        self._runtime = runtime
        self._router = router
        self._base = ServedModel(name=runtime.base_name, adapter=None, created=int(time.time()))
        self._verified: set[int] = set()
        # name → (expiry, resolution). A database round trip per request costs the API process
        # more than the rest of the gateway's work; admin writes in this process invalidate at
        # once, other replicas' writes within a poll (gateway/registry_watch.py). Misses are
        # never cached, so a new version is servable on the very next request everywhere.
        self._ttl = cache_ttl_s
        self._cache: dict[tuple[str, str], tuple[float, ServedModel]] = {}
        # tenant → (expiry, every name it may use → current version, without files): the first
        # request for a name the tenant has not used yet needs no query of its own. A burst of
        # first requests (a closed loop's start, 1000 adapters under Zipf traffic) otherwise
        # queued one two-query resolution each on the registry connection.
        self._scopes: dict[str, tuple[float, dict[str, ResolvedAdapter]]] = {}
        self._scope_loads: dict[str, asyncio.Future[dict[str, ResolvedAdapter]]] = {}
        # Every scope load still running, shared or not (invalidate() forgets the shared ones):
        # a caller that hung up leaves its load running, which close() must not outlive.
        self._running_loads: set[asyncio.Future[dict[str, ResolvedAdapter]]] = set()
        # Bumped by invalidate(): a resolution read before a change (it awaits the registry and
        # the gate) must not be cached after it, or it would outlive the change by a TTL.
        self._epoch = 0
        self._outage = RegistryOutage("model names", cache_ttl_s, runtime.sessions)

    async def list_models(self, caller: Principal) -> list[ServedModel]:
        runtime = self._runtime
        async with runtime.sessions() as session:
            resolved = await service.list_resolvable(
                session,
                store=runtime.store,
                tenant=caller.tenant,
                base_sha256=runtime.base.weights_sha256,
            )
        adapters = [
            ServedModel(
                r.name,
                None,
                int(r.created_at.timestamp()),
                parent=self._base.name,
                owned_by=_owner_seen_by(r.tenant, caller.tenant),
                adapter_name=r.name,
                version=r.version,
            )
            for r in resolved
        ]
        base = [self._base] if caller.policy.allow_base_model else []
        return [*base, *adapters]

    async def resolve(self, name: str, caller: Principal, caller_key: str = "") -> ServedModel:
        routed = self._router.route(name, caller_key) if self._router is not None else None
        if routed is not None:
            # A rollout steers this name: the caller's side of the canary, or the stable's
            # fallback target. Scope still applies: the target resolves for this tenant.
            await self._resolve_named(name, caller)  # the name itself must be in scope
            if routed == "base":
                return self._fallback_to_base(name, caller)
            try:
                return replace(await self._resolve_named(routed, caller), name=name, pinned=False)
            except ModelNotFound:
                if parse_address(routed).name != name:
                    # A fallback to another adapter this caller may not use (the owner's
                    # private one, for a tenant the name is shared with), or one gone since:
                    # the stable was taken out of service, so not the stable; the base, as a
                    # fallback to the base would.
                    logger.info(
                        "%s falls back to %s, outside %s's scope: the base serves it",
                        name,
                        routed,
                        caller.tenant,
                    )
                    return self._fallback_to_base(name, caller)
                # This replica's view is behind the registry: another replica rolled the
                # routed version back (or it was retired) since our last poll. A switch must
                # never fail a request, so the caller gets the name's stable now and the next
                # poll brings the new view.
                logger.info("stale rollout view: %s is gone, %s serves its stable", routed, name)
                return await self._resolve_named(name, caller)
        return await self._resolve_named(name, caller)

    def _fallback_to_base(self, name: str, caller: Principal) -> ServedModel:
        if not caller.policy.allow_base_model:
            raise ModelUnavailable(name)
        return replace(self._base, name=name)

    async def describe(self, name: str, caller: Principal) -> ServedModel:
        """`name` itself in the caller's scope, for its model card: where a rollout sends this
        caller's requests is per request, and not the card's business."""
        return await self._resolve_named(name, caller)

    async def _resolve_named(self, name: str, caller: Principal) -> ServedModel:
        """`name` (its stable) or `name@N`, in the caller's scope; no rollout routing."""
        if name == self._base.name:
            if not caller.policy.allow_base_model:
                raise ModelNotFound(name)
            return self._base
        key = (caller.tenant, name)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        stale = cached if cached is not None and self._outage.usable(cached[0], now) else None
        if stale is not None and self._outage.skip_registry(now):
            return stale[1]
        epoch = self._epoch
        try:
            served = await self._resolve_uncached(name, caller.tenant)
        except Exception as exc:
            if not self._outage.note_failure(exc):
                raise
            if stale is not None and epoch == self._epoch:  # not retired meanwhile
                return stale[1]
            raise RegistryUnavailable() from exc
        if epoch == self._epoch:  # else a change arrived meanwhile: serve it once, keep nothing
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[key] = (now + self._ttl, served)
        return served

    async def close(self) -> None:
        """At shutdown, before the registry's engine is disposed (see RegistryOutage.close):
        the outage probe and every scope load still running are cancelled and awaited."""
        await self._outage.close()
        loads = list(self._running_loads)
        for load in loads:
            load.cancel()
        await asyncio.gather(*loads, return_exceptions=True)

    def invalidate(self) -> None:
        self._epoch += 1
        self._cache.clear()
        self._scopes.clear()
        self._scope_loads.clear()  # loads in flight finish for their callers, uncached

    async def _resolve_uncached(self, name: str, tenant: str) -> ServedModel:
        runtime = self._runtime
        try:
            # A plain name is its current version: from the tenant's scope when it is there.
            # `name@N`, or a name the scope lacks (registered since it was read), is asked of
            # the registry on its own, so a snapshot never answers 404 for a real adapter.
            resolved = None if "@" in name else (await self._scope(tenant)).get(name)
            if resolved is None:
                async with runtime.sessions() as session:
                    resolved = await service.resolve_adapter(
                        session,
                        store=runtime.store,
                        model=name,
                        tenant=tenant,
                        base_sha256=runtime.base.weights_sha256,
                        with_path=False,
                    )
                self._outage.answered()
            # Outside the session: a remote store downloads here, and a pooled connection held
            # meanwhile is one fewer for every other tenant's requests.
            if resolved.path is None:
                path = await runtime.store.get_path(resolved.artifact_sha256)
                resolved = replace(resolved, path=path)
        except (NotFound, InvalidName):
            raise ModelNotFound(name) from None
        if resolved.path is None:
            raise ModelNotFound(name)
        await self._gate_before_first_load(resolved, resolved.path)
        weights = resolved.path / "adapter_model.safetensors"
        handle = AdapterHandle(
            engine_id=resolved.version_id,
            path=str(resolved.path),
            size_bytes=weights.stat().st_size,
        )
        return ServedModel(
            name,
            handle,
            int(resolved.created_at.timestamp()),
            parent=self._base.name,
            owned_by=_owner_seen_by(resolved.tenant, tenant),
            adapter_name=resolved.name,
            version=resolved.version,
            owner=resolved.tenant,
            pinned="@" in name,
        )

    async def _scope(self, tenant: str) -> dict[str, ResolvedAdapter]:
        """Every name `tenant` may use → its current version (no files), read in one go
        (`service.list_resolvable`: two queries) and shared by concurrent first requests."""
        held = self._scopes.get(tenant)
        now = time.monotonic()
        if held is not None and held[0] > now:
            return held[1]
        stale = held[1] if held is not None and self._outage.usable(held[0], now) else None
        if stale is not None and self._outage.skip_registry(now):
            return stale
        loading = self._scope_loads.get(tenant)
        if loading is None:
            loading = asyncio.ensure_future(self._load_scope(tenant))
            self._scope_loads[tenant] = loading
            self._running_loads.add(loading)
            loading.add_done_callback(self._running_loads.discard)

            def done(task: asyncio.Future[dict[str, ResolvedAdapter]]) -> None:
                if self._scope_loads.get(tenant) is task:
                    del self._scope_loads[tenant]

            loading.add_done_callback(done)
        try:
            return await asyncio.shield(loading)
        except Exception as exc:
            # The name the caller asked for may be in the tenant's last snapshot though not in
            # the name cache (a first request for it); invalidate() dropped the snapshot if a
            # change since reached this replica.
            still = self._scopes.get(tenant)
            if stale is None or still is None or still[1] is not stale:
                raise
            if not self._outage.note_failure(exc):
                raise
            return stale

    async def _load_scope(self, tenant: str) -> dict[str, ResolvedAdapter]:
        runtime = self._runtime
        started = time.monotonic()
        async with runtime.sessions() as session:
            resolved = await service.list_resolvable(
                session,
                store=runtime.store,
                tenant=tenant,
                base_sha256=runtime.base.weights_sha256,
            )
        self._outage.answered()
        scope = {r.name: r for r in resolved}
        if self._scope_loads.get(tenant) is asyncio.current_task():  # not invalidated meanwhile
            if len(self._scopes) >= MAX_SCOPES:
                self._scopes.clear()
            self._scopes[tenant] = (started + self._ttl, scope)
        return scope

    async def _gate_before_first_load(self, resolved: ResolvedAdapter, path: Path) -> None:
        """Re-run the whole gate on the stored files once per version and process, and check
        they are the version's registered artifact: what reaches the engine is what passed, even
        if the store was tampered with since registration (a compatible but different adapter
        written into its folder would pass the gate)."""
        if resolved.version_id in self._verified:
            return
        runtime = self._runtime
        address = resolved.address
        artifact = await asyncio.to_thread(inspect_adapter, path)
        problems = run_gate(artifact, runtime.base, runtime.limits())
        if problems:
            logger.error("refusing to load %s: %s", address, "; ".join(p.message for p in problems))
            raise ModelNotFound(address.split("@")[0])
        stored = _stored_digest(artifact)
        if stored != resolved.artifact_sha256:
            logger.error(
                "refusing to load %s: its files at %s have digest %s, not the registered %s",
                address,
                path,
                stored,
                resolved.artifact_sha256,
            )
            raise AdapterLoadFailed(f"The adapter for `{address.split('@')[0]}` failed to load.")
        self._verified.add(resolved.version_id)

    def forget(self, version_id: int) -> None:
        self._verified.discard(version_id)
        self.invalidate()


def _stored_digest(artifact: AdapterArtifact) -> str | None:
    """The tree digest of the files the gate read, as registration computed it (the gate
    refuses a folder lacking either file, so None never gets this far)."""
    digests = artifact.file_digests
    if not all(name in digests for name in ARTIFACT_FILES):
        return None
    return tree_digest({n: Entry(digests[n].size, digests[n].sha256) for n in ARTIFACT_FILES})


def _owner_seen_by(owner: str, caller: str) -> str:
    """Another tenant's name is not the caller's business, even on an adapter shared with it."""
    return owner if owner == caller else "shared"
