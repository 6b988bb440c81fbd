"""Admin operations on adapters: ingest (upload or allow-listed path), register, retire, delete,
each kept in sync with the engine so a retired version stops being served at once."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import UploadFile

from gateway.adapter_cache import HostAdapterCache
from gateway.audit_log import registry_operation
from gateway.catalog import RegistryCatalog
from gateway.errors import InvalidRequest
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.card import derived_card
from registry.errors import ArtifactNotFound, InvalidInput, RegistryConflict
from registry.ingest import ingest_upload, receive_stream, stage_local_path
from registry.ingest_s3 import check_s3_uri, stage_s3_uri
from registry.models import AdapterVersion
from registry.rank_spectrum import ModuleSpectrum, rank_needed, spectra, write_truncated
from registry.stack_weights import StackInput, write_stack
from registry.states import VersionState, Visibility
from registry.store.s3 import make_s3_client

logger = logging.getLogger(__name__)
T = TypeVar("T")

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CHUNK_BYTES = 1024 * 1024


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk


def _registering(fields: dict[str, Any]) -> AbstractAsyncContextManager[None]:
    # Staging is inside: an unsafe archive, a path outside the import roots, a bucket off the
    # allow-list or an oversize upload is a refused registration, audited and counted.
    return registry_operation(
        "register", fields["actor"], adapter=fields["name"], tenant=fields["tenant"]
    )


@dataclass
class S3Import:
    """Where s3:// registrations may come from; the client is built on first use, so the
    `s3` extra is needed only by gateways that use it."""

    buckets: list[str] = field(default_factory=list)
    endpoint_url: str | None = None
    region: str | None = None
    _client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = make_s3_client(endpoint_url=self.endpoint_url, region=self.region)
        return self._client


class AdapterAdmin:
    def __init__(
        self,
        runtime: RegistryRuntime,
        cache: HostAdapterCache,
        catalog: RegistryCatalog,
        upload_max_bytes: int,
        import_roots: list[Path],
        s3_import: S3Import | None = None,
    ):
        self._runtime = runtime
        self._cache = cache
        self._catalog = catalog
        self._max_bytes = upload_max_bytes
        self._import_roots = import_roots
        self._s3 = s3_import or S3Import()
        self._weight_jobs = asyncio.Semaphore(1)

    async def register_upload(self, files: list[UploadFile], **fields: Any) -> AdapterVersion:
        """Either the two PEFT files, or one .tar/.zip of a PEFT folder; streamed to disk."""
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as work:
            async with _registering(fields):
                folder = await self._receive(files, Path(work))
                row = await self._register(folder, **fields)
        self._catalog.invalidate()  # after the commit: `name` now means the new version
        return row

    async def register_path(self, path: str, **fields: Any) -> AdapterVersion:
        """A local folder under an allow-listed root, or an s3:// URI in an allow-listed bucket
        (downloaded with the upload size limit, then gated like an upload)."""
        with tempfile.TemporaryDirectory(prefix="loraplex-import-") as work:
            async with _registering(fields):
                if path.startswith("s3://"):
                    # Judged before the client is built: a gateway without the s3 extra still
                    # refuses a bucket off the allow-list as the caller's mistake.
                    check_s3_uri(path, allowed_buckets=self._s3.buckets)
                    folder = await stage_s3_uri(
                        path,
                        workdir=Path(work),
                        max_bytes=self._max_bytes,
                        client=self._s3.client(),
                        allowed_buckets=self._s3.buckets,
                    )
                else:
                    folder = stage_local_path(path, allowed_roots=self._import_roots)
                row = await self._register(folder, **fields)
        self._catalog.invalidate()
        return row

    async def register_stack(
        self,
        components: list[tuple[str, float]],
        *,
        description: str | None,
        rollback_path: str,
        **fields: Any,
    ) -> AdapterVersion:
        """A new version holding `components` ((address, weight), as the tenant addresses
        them) side by side; refused with every reason when their cards do not allow it."""
        runtime = self._runtime
        base_sha256 = runtime.base.weights_sha256
        recipe = " ".join(f"{weight!r}x{address}" for address, weight in components)
        with tempfile.TemporaryDirectory(prefix="loraplex-stack-") as work:
            async with registry_operation(
                "stack",
                fields["actor"],
                adapter=fields["name"],
                tenant=fields["tenant"],
                components=recipe,
            ):
                async with runtime.sessions() as session:
                    parts, problems = await service.resolve_stack(
                        session,
                        store=runtime.store,
                        tenant=fields["tenant"],
                        components=components,
                        base_sha256=base_sha256,
                    )
                    problems += service.stacking_problems(
                        parts, max_lora_rank=runtime.max_lora_rank
                    )
                    if problems:
                        await service.refuse_stack(
                            session,
                            actor=fields["actor"],
                            name=fields["name"],
                            tenant=fields["tenant"],
                            problems=problems,
                        )
                folder = await self._build_stack(parts, Path(work) / "stack")
                card = service.stack_card(
                    parts,
                    tenant=fields["tenant"],
                    base_sha256=base_sha256,
                    description=description,
                    rollback_path=rollback_path,
                )
                row = await self._register(folder, card=card, base_sha256=None, **fields)
        self._catalog.invalidate()
        return row

    async def _build_stack(self, parts: list[service.StackPart], folder: Path) -> Path:
        """The stacked PEFT folder, from the components' artifacts fetched outside any session."""
        inputs = [StackInput(await self._fetch(p.artifact_sha256), p.weight) for p in parts]
        await self._on_weights(write_stack, inputs, folder, max_bytes=self._max_bytes)
        return folder

    async def spectrum(
        self, name: str, version: int
    ) -> tuple[AdapterVersion, list[ModuleSpectrum]]:
        """The version's row and every module's singular values (read from its artifact)."""
        async with self._runtime.sessions() as session:
            row = await service.get_version(session, name=name, version=version)
        _refuse_out_of_service(row)
        return row, await self._on_weights(spectra, await self._fetch(row.artifact_sha256))

    async def truncate(
        self,
        name: str,
        version: int,
        *,
        rank: int | None,
        energy: float | None,
        reason: str | None,
        actor: str,
    ) -> AdapterVersion:
        """A new version of `name` with every module of `version` cut to its best rank-k
        approximation (k given, or the least that keeps `energy` of every module)."""
        target_label = {"rank": rank} if rank is not None else {"energy": energy}
        async with registry_operation(
            "truncate", actor, adapter=name, version=version, **target_label
        ):
            row, modules = await self.spectrum(name, version)
            if row.state == VersionState.ROLLED_BACK:
                raise InvalidInput(
                    f"{name}@{version} was rolled back: a truncation would release it again "
                    "under new files; register a fixed version instead"
                )
            target = rank if rank is not None else rank_needed(modules, energy or 1.0)
            if target >= row.rank:
                raise InvalidInput(
                    f"{name}@{version} has rank {row.rank}: truncating to {target} saves nothing"
                )
            kept = min(module.energy_at(target) for module in modules)
            try:
                card = derived_card(
                    row.card,
                    owner=row.adapter.tenant.name,
                    truncated_from=f"{name}@{version}",
                    truncated_rank=target,
                    energy_kept=round(kept, 6),
                    truncation_reason=reason,
                )
            except ValueError as exc:
                raise InvalidInput(f"{name}@{version}: {exc}") from None
            with tempfile.TemporaryDirectory(prefix="loraplex-truncate-") as work:
                folder = Path(work) / "truncated"
                path = await self._fetch(row.artifact_sha256)
                await self._on_weights(
                    write_truncated, path, folder, target, max_bytes=self._max_bytes
                )
                async with self._runtime.sessions() as session:  # retired or deleted meanwhile?
                    _refuse_out_of_service(
                        await service.get_version(session, name=name, version=version)
                    )
                new = await self._register(
                    folder,
                    name=name,
                    tenant=row.adapter.tenant.name,
                    visibility=None,
                    card=card,
                    base_sha256=None,
                    actor=actor,
                )
        self._catalog.invalidate()
        return new

    async def _fetch(self, digest: str) -> Path:
        try:
            return await self._runtime.store.get_path(digest)
        except ArtifactNotFound:
            raise _deleted_meanwhile() from None

    async def _on_weights(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`work` on adapter weights in a thread, one such job at a time per replica (each holds
        a module's matrices of every input, and its output on disk)."""
        try:
            async with self._weight_jobs:
                return await asyncio.to_thread(work, *args, **kwargs)
        except FileNotFoundError:
            raise _deleted_meanwhile() from None

    async def _receive(self, files: list[UploadFile], work: Path) -> Path:
        names = sorted(Path(f.filename or "").name for f in files)
        if len(files) == 1 and names[0].endswith(ARCHIVE_SUFFIXES):
            return await ingest_upload(_chunks(files[0]), workdir=work, max_bytes=self._max_bytes)
        if names != sorted(PEFT_FILES):
            raise InvalidRequest(
                f"upload either {' and '.join(PEFT_FILES)} or one archive "
                f"({', '.join(ARCHIVE_SUFFIXES)}) of a PEFT folder; got {names}",
                param="files",
            )
        folder = work / "adapter"
        folder.mkdir()
        budget = self._max_bytes  # one limit for the whole upload, not per file
        for upload in files:
            received = await receive_stream(_chunks(upload), directory=work, max_bytes=budget)
            budget -= received.size
            received.path.rename(folder / Path(upload.filename or "").name)
        return folder

    async def _register(
        self,
        folder: Path,
        *,
        name: str,
        tenant: str,
        visibility: str | None,
        card: dict[str, Any] | str | None,
        base_sha256: str | None,
        actor: str,
    ) -> AdapterVersion:
        runtime = self._runtime
        async with runtime.sessions() as session:
            return await service.register_adapter_version(
                session,
                store=runtime.store,
                artifact_dir=folder,
                name=name,
                tenant=tenant,
                served_base=runtime.base,
                max_lora_rank=runtime.max_lora_rank,
                engine_dtype=runtime.engine_dtype,
                actor=actor,
                visibility=Visibility(visibility) if visibility is not None else None,
                card=card,
                base_sha256=base_sha256,
            )

    async def retire(
        self, name: str, version: int, reason: str | None, actor: str
    ) -> AdapterVersion:
        async with (
            registry_operation("retire", actor, adapter=name, version=version),
            self._runtime.sessions() as session,
        ):
            row = await service.retire_version(
                session, name=name, version=version, actor=actor, reason=reason
            )
        await self._unload(row)
        return row

    async def delete(
        self, name: str, version: int, reason: str | None, actor: str
    ) -> AdapterVersion:
        async with (
            registry_operation("delete", actor, adapter=name, version=version),
            self._runtime.sessions() as session,
        ):
            row = await service.delete_version(
                session,
                store=self._runtime.store,
                name=name,
                version=version,
                actor=actor,
                reason=reason,
            )
        await self._unload(row)
        return row

    async def forget_removed(self) -> None:
        """After any registry change (RegistryWatch): versions retired or deleted through any
        replica leave this one's engine too (else they stay loaded and counted until LRU), and
        local copies of deleted artifacts leave its disk (a remote store's download cache,
        which only the deleting replica cleaned)."""
        store = self._runtime.store
        copies = await store.local_copies()
        async with self._runtime.sessions() as session:
            removed = await service.removed_versions(session, self._cache.known())
            garbage = await service.deleted_artifacts(session, copies)
        for version_id in removed:
            if not self._cache.forgotten(version_id):
                logger.info("version id %s was retired or deleted elsewhere: unloading", version_id)
            self._catalog.forget(version_id)
            await self._cache.forget(version_id)
        for digest in garbage:
            logger.info("dropping the local copy of deleted artifact %s", digest)
            await store.drop_local_copy(digest)

    async def _unload(self, row: AdapterVersion) -> None:
        """New requests stop resolving at once (the catalog reads the registry); the engine's
        loaded copy is dropped once no running request holds it."""
        self._catalog.forget(row.id)
        await self._cache.forget(row.id)


def _refuse_out_of_service(row: AdapterVersion) -> None:
    if row.state in (VersionState.RETIRED, VersionState.DELETED):
        raise InvalidInput(
            f"{row.adapter.name}@{row.version} is {row.state.value}: its weights are not worked on"
        )


def _deleted_meanwhile() -> RegistryConflict:
    return RegistryConflict("an artifact being read was deleted meanwhile; retry")
