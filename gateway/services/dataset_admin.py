"""Datasets' n-gram filters (registered, shown, deleted, an eval suite checked against one),
and withdrawing a dataset: every adapter version whose card lists it taken out of service,
through the same retire and delete paths as one version's (audit rows, the catalog and the
engine's copy dropped on every replica), each version on its own so that one refusal leaves
the others done and a second call finishes the job."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from sqlalchemy.exc import SQLAlchemyError

from gateway.evals.contamination import Contamination, check_suite
from gateway.evals.suite import Suite
from gateway.registry_runtime import RegistryRuntime
from gateway.schemas.admin_datasets import DatasetRevokedOut, RevokedVersionOut
from gateway.services.adapter_admin import AdapterAdmin
from registry import service
from registry.errors import InvalidStateTransition, RegistryError
from registry.models import DatasetNgramFilter
from registry.states import VersionState

logger = logging.getLogger(__name__)

Action = Literal["retire", "delete"]
Outcome = Literal[
    "retired", "deleted", "already_retired", "already_deleted", "refused", "failed", "skipped"
]
# What each action leaves alone: a retired version is deleted by "delete", never revived.
DONE: dict[Action, frozenset[VersionState]] = {
    "retire": frozenset({VersionState.RETIRED, VersionState.DELETED}),
    "delete": frozenset({VersionState.DELETED}),
}
ALREADY: dict[VersionState, Outcome] = {
    VersionState.RETIRED: "already_retired",
    VersionState.DELETED: "already_deleted",
}


class RegistryDown(Exception):
    """The registry failed under one version: the rest are not tried (each would wait out
    the same failure)."""


class DatasetAdmin:
    def __init__(self, runtime: RegistryRuntime, adapters: AdapterAdmin):
        self._runtime = runtime
        self._adapters = adapters

    async def lineage(self, dataset_sha256: str) -> tuple[str, list[service.TrainedOn]]:
        digest = service.dataset_digest(dataset_sha256)
        async with self._runtime.sessions() as session:
            return digest, await service.versions_trained_on(session, dataset_sha256=digest)

    async def register_ngram_filter(
        self, dataset_sha256: str, data: bytes, actor: str
    ) -> DatasetNgramFilter:
        # Decoding and counting a large filter's bits is CPU work: off the event loop.
        header, ngram_filter, rate = await asyncio.to_thread(
            service.read_ngram_filter, data, dataset_sha256=dataset_sha256
        )
        async with self._runtime.sessions() as session:
            return await service.register_ngram_filter(
                session,
                header=header,
                ngram_filter=ngram_filter,
                false_positive_rate=rate,
                actor=actor,
            )

    async def ngram_filter(self, dataset_sha256: str) -> DatasetNgramFilter:
        async with self._runtime.sessions() as session:
            return await service.get_ngram_filter_info(session, dataset_sha256=dataset_sha256)

    async def delete_ngram_filter(self, dataset_sha256: str, actor: str) -> DatasetNgramFilter:
        async with self._runtime.sessions() as session:
            return await service.delete_ngram_filter(
                session, dataset_sha256=dataset_sha256, actor=actor
            )

    async def check_suite(self, dataset_sha256: str, suite: Suite) -> Contamination:
        """The suite against the dataset's filter. Raises NgramFilterNotFound."""
        digest = service.dataset_digest(dataset_sha256)
        async with self._runtime.sessions() as session:
            filters = await service.load_ngram_filters(session, dataset_sha256s=[digest])
        if digest not in filters:
            raise service.NgramFilterNotFound(
                f"no n-gram filter is registered for dataset sha256:{digest}"
            )
        row, ngram_filter = filters[digest]
        return await asyncio.to_thread(
            check_suite, digest, ngram_filter, row.false_positive_rate, suite
        )

    async def revoke(
        self, dataset_sha256: str, action: Action, reason: str | None, actor: str
    ) -> DatasetRevokedOut:
        digest, trained = await self.lineage(dataset_sha256)
        why = f"dataset sha256:{digest} revoked" + (f": {reason}" if reason else "")
        versions: list[RevokedVersionOut] = []
        down: str | None = None
        for entry in serving_last(trained):
            if down is not None:
                versions.append(_out(entry, entry.state, "skipped", down))
                continue
            try:
                versions.append(await self._revoke_version(entry, action, why, actor))
            except RegistryDown as exc:
                down = "not tried: the registry failed on an earlier version; revoke again"
                versions.append(_out(entry, entry.state, "failed", str(exc)))
        complete = all(v.outcome in ("retired", "deleted", *ALREADY.values()) for v in versions)
        return DatasetRevokedOut(
            dataset_sha256=digest, action=action, complete=complete, versions=versions
        )

    async def _revoke_version(
        self, entry: service.TrainedOn, action: Action, why: str, actor: str
    ) -> RevokedVersionOut:
        if entry.state in DONE[action]:
            return _out(entry, entry.state, ALREADY[entry.state])
        state = entry.state
        try:
            # Deleting goes through retiring: that hands a serving version's name to its
            # successor, which delete refuses to do (the stable, a production version).
            if state is not VersionState.RETIRED:
                state = (
                    await self._adapters.retire(entry.adapter, entry.version, why, actor)
                ).state
            if action == "delete":
                state = (
                    await self._adapters.delete(entry.adapter, entry.version, why, actor)
                ).state
        except InvalidStateTransition as exc:  # a running canary, a fallback's target...
            now = await self._state_now(entry) or state
            if now in DONE[action]:  # another call took it out meanwhile
                return _out(entry, now, ALREADY[now])
            logger.warning("%s: %s@%d refused: %s", why, entry.adapter, entry.version, exc)
            return _out(entry, now, "refused", exc.message)
        except RegistryError as exc:  # this version's own problem (its artifact, a race)
            logger.warning("%s: %s@%d failed: %s", why, entry.adapter, entry.version, exc)
            return _out(entry, state, "failed", exc.message)
        except SQLAlchemyError as exc:
            logger.warning("%s: the registry failed at %s@%d", why, entry.adapter, entry.version)
            raise RegistryDown("the registry failed; revoke again") from exc
        return _out(entry, state, "retired" if action == "retire" else "deleted")

    async def _state_now(self, entry: service.TrainedOn) -> VersionState | None:
        try:
            async with self._runtime.sessions() as session:
                row = await service.get_version(session, name=entry.adapter, version=entry.version)
                return row.state
        except (RegistryError, SQLAlchemyError):
            return None


def serving_last(trained: list[service.TrainedOn]) -> list[service.TrainedOn]:
    """Per adapter, the version that serves its name last (its pinned stable, else its newest):
    retiring it hands the name to the newest version still in service, which must not be one
    this revocation is about to take out."""
    return sorted(trained, key=lambda t: (t.adapter, t.version == t.stable_version, t.version))


def _out(
    entry: service.TrainedOn, state: VersionState, outcome: Outcome, reason: str | None = None
) -> RevokedVersionOut:
    return RevokedVersionOut(
        adapter=entry.adapter,
        tenant=entry.tenant,
        version=entry.version,
        state=state.value,
        outcome=outcome,
        reason=reason,
    )
