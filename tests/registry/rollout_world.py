"""A registry with real adapters for the rollout tests: tenants acme and globex on one tiny base,
and helpers that register versions, count rows and sample the routing of many callers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from registry import service
from registry.compat import BaseModelFingerprint
from registry.models import RolloutEvent
from registry.rollout import assign
from registry.states import VersionState
from registry.store.local import LocalArtifactStore

# 100 callers plus 5 who are in acme-support's canary from 1 %, so every stage sends someone.
CALLERS = [f"user-{i}" for i in range(100)] + [
    key for key in (f"early-{i}" for i in range(2_000)) if assign(key, "acme-support", 1)
][:5]


@dataclass
class World:
    session: AsyncSession
    store: LocalArtifactStore
    base_fp: BaseModelFingerprint
    make_adapter: Callable[..., Path]

    def artifact(self, n: int) -> Path:
        """A distinct real peft adapter per n (a version's files must differ from the last)."""
        return self.make_adapter(
            f"rollout-{n}", r=2 + n, lora_alpha=4, target_modules=["q_proj", "v_proj"]
        )

    async def register(
        self,
        name: str,
        n: int,
        *,
        tenant: str = "acme",
        session: AsyncSession | None = None,
        **kw: Any,
    ) -> int:
        """Register artifact(n) as a new version of `name`, in `session` (default: the
        world's own) so that race tests can register from a session of their own."""
        row = await service.register_adapter_version(
            session or self.session,
            store=self.store,
            artifact_dir=self.artifact(n),
            name=name,
            tenant=tenant,
            served_base=self.base_fp,
            max_lora_rank=16,
            actor=f"admin@{tenant}",
            **kw,
        )
        return row.version

    async def evaluated(self, name: str, n: int, **kw: Any) -> int:
        version = await self.register(name, n, **kw)
        await service.mark_evaluated(self.session, name=name, version=version, actor="evals")
        return version

    async def state(self, name: str, version: int) -> VersionState:
        row = await service.get_version(self.session, name=name, version=version)
        await self.session.refresh(row)
        return row.state

    async def events(self, name: str) -> list[RolloutEvent]:
        return await service.list_rollout_events(self.session, name=name)

    async def event_count(self) -> int:
        query = select(func.count()).select_from(RolloutEvent)
        return int(await self.session.scalar(query) or 0)

    async def routes(self, model: str, tenant: str = "acme") -> Counter[str]:
        """Where each of CALLERS' requests for `model` goes ("base" for the base model)."""
        seen: Counter[str] = Counter()
        for caller in CALLERS:
            resolved = await service.resolve_rollout_version(
                self.session, store=self.store, model=model, caller_key=caller, tenant=tenant
            )
            seen["base" if resolved is None else resolved.address] += 1
        return seen


async def make_world(
    session: AsyncSession,
    store: LocalArtifactStore,
    base_fp: BaseModelFingerprint,
    make_adapter: Callable[..., Path],
) -> World:
    await service.register_base_model(session, name="tiny", fingerprint=base_fp, actor="system")
    for tenant in ("acme", "globex"):
        await service.create_tenant(session, name=tenant, actor="root")
    return World(session, store, base_fp, make_adapter)
