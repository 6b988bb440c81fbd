"""Admin operations on adapters: ingest (upload or allow-listed path), register, retire, delete,
each kept in sync with the engine so a retired version stops being served at once."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import UploadFile

from gateway.catalog import RegistryCatalog
from gateway.engine.client import EngineClient
from gateway.errors import InvalidRequest
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.ingest import ingest_upload, receive_stream, stage_local_path
from registry.models import AdapterVersion
from registry.states import Visibility

logger = logging.getLogger(__name__)

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CHUNK_BYTES = 1024 * 1024


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk


class AdapterAdmin:
    def __init__(
        self,
        runtime: RegistryRuntime,
        engine: EngineClient,
        catalog: RegistryCatalog,
        upload_max_bytes: int,
        import_roots: list[Path],
    ):
        self._runtime = runtime
        self._engine = engine
        self._catalog = catalog
        self._max_bytes = upload_max_bytes
        self._import_roots = import_roots

    async def register_upload(self, files: list[UploadFile], **fields: Any) -> AdapterVersion:
        """Either the two PEFT files, or one .tar/.zip of a PEFT folder; streamed to disk."""
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as work:
            folder = await self._receive(files, Path(work))
            return await self._register(folder, **fields)

    async def register_path(self, path: str, **fields: Any) -> AdapterVersion:
        folder = stage_local_path(path, allowed_roots=self._import_roots)
        return await self._register(folder, **fields)

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
        visibility: str,
        card: dict[str, Any] | str | None,
        base_sha256: str | None,
        actor: str,
    ) -> AdapterVersion:
        runtime = self._runtime
        async with runtime.sessions() as session:
            row = await service.register_adapter_version(
                session,
                store=runtime.store,
                artifact_dir=folder,
                name=name,
                tenant=tenant,
                served_base=runtime.base,
                max_lora_rank=runtime.max_lora_rank,
                actor=actor,
                visibility=Visibility(visibility),
                card=card,
                base_sha256=base_sha256,
            )
        self._catalog.invalidate()  # after the commit: `name` now means the new version
        return row

    async def retire(
        self, name: str, version: int, reason: str | None, actor: str
    ) -> AdapterVersion:
        async with self._runtime.sessions() as session:
            row = await service.retire_version(
                session, name=name, version=version, actor=actor, reason=reason
            )
        await self._unload(row)
        return row

    async def delete(
        self, name: str, version: int, reason: str | None, actor: str
    ) -> AdapterVersion:
        async with self._runtime.sessions() as session:
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

    async def _unload(self, row: AdapterVersion) -> None:
        """New requests stop resolving at once (the catalog reads the registry); the engine's
        cached copy is dropped too."""
        self._catalog.forget(row.id)
        try:
            await self._engine.remove_adapter(row.id)
        except Exception:  # not loaded, or engine gone: nothing to unload either way
            logger.debug("engine had no adapter %s to remove", row.id, exc_info=True)
