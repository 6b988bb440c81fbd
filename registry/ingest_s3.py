"""Registration from `s3://bucket/key`: the object store as a fourth way into registry.ingest.

The URI names either a folder (a prefix holding adapter_config.json and
adapter_model.safetensors: exactly those two objects are fetched, whatever else lies beside them)
or one .tar/.tar.gz/.tgz/.zip object, which is unpacked by `extract_archive` with the same limits
as an upload. Sizes follow upload rules: one `max_bytes` for everything fetched, checked against
the announced ContentLength before any byte moves and again, by `receive_stream`, on the bytes
actually written. Objects are streamed to disk, never held in memory, and read with If-Match on
the ETag seen by HEAD, so a file replaced mid-download is refused instead of mixed.

Refusals: malformed URI, bucket outside `allowed_buckets`, S3 access denied → PathNotAllowed;
no such object or bucket → NotFound; a folder with pickle weights or a missing file is staged
as it is, for the gate to refuse with every reason and audit; too large → UploadTooLarge; bad
archive → UnsafeArchive; an object that changed while read → IngestError. Other S3 or network
failures propagate: they are the server's problem, not the caller's.

The client is a synchronous boto3 S3 client (`make_s3_client`); every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from registry.compat.artifact import ADAPTER_WEIGHTS, ARTIFACT_FILES
from registry.errors import (
    IngestError,
    NotFound,
    PathNotAllowed,
    UploadTooLarge,
)
from registry.ingest import CHUNK, ArchiveLimits, extract_archive, receive_stream
from registry.store.s3 import S3Uri, S3UriError, parse_s3_uri, s3_error_code

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
PICKLE_WEIGHTS = "adapter_model.bin"  # what peft writes with safe_serialization=False
# A missing bucket is the caller's mistake here (unlike for the artifact store's own bucket).
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "Forbidden", "AllAccessDisabled"})
_CHANGED_CODES = frozenset({"412", "PreconditionFailed"})


@dataclass(frozen=True)
class _Head:
    size: int
    etag: str | None


async def stage_s3_uri(
    uri: str,
    *,
    workdir: Path,
    max_bytes: int,
    client: Any,
    allowed_buckets: Sequence[str] | None = None,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Fetch the adapter at `uri` under workdir; returns the local PEFT folder for the gate.

    `allowed_buckets=None` accepts any bucket the client can read; an empty list accepts none.
    The caller owns workdir and removes it afterwards."""
    location = check_s3_uri(uri, allowed_buckets=allowed_buckets)
    if location.key.lower().endswith(ARCHIVE_SUFFIXES):
        limits = limits or ArchiveLimits.for_upload(max_bytes)  # unpacked, too
        return await _stage_archive(location, workdir, max_bytes, client, limits)
    return await _stage_folder(location, workdir, max_bytes, client)


def check_s3_uri(uri: str, *, allowed_buckets: Sequence[str] | None = None) -> S3Uri:
    """Parse and authorise a registration URI; raises PathNotAllowed naming the broken rule."""
    try:
        location = parse_s3_uri(uri)
    except S3UriError as exc:
        raise PathNotAllowed(str(exc)) from None
    if allowed_buckets is not None and location.bucket not in allowed_buckets:
        raise PathNotAllowed(f"bucket {location.bucket!r} is not in the allowed adapter buckets")
    name = location.key.rstrip("/").rsplit("/", 1)[-1]
    if name in ARTIFACT_FILES or name == PICKLE_WEIGHTS:
        folder = location.key[: -len(name)]
        raise PathNotAllowed(
            f"{location} names one file; give its folder s3://{location.bucket}/{folder} "
            f"or one {'/'.join(ARCHIVE_SUFFIXES)} archive"
        )
    return location


async def _stage_archive(
    location: S3Uri, workdir: Path, max_bytes: int, client: Any, limits: ArchiveLimits
) -> Path:
    head = await _head(client, location)
    if head.size > max_bytes:
        raise UploadTooLarge(max_bytes)
    archive = await _download(client, location, head, directory=workdir, max_bytes=max_bytes)
    try:
        folder = await asyncio.to_thread(
            extract_archive, archive, workdir / "extracted", limits=limits
        )
    finally:
        archive.unlink(missing_ok=True)
    logger.info("staged archive %s (%d bytes)", location, head.size)
    return folder


async def _stage_folder(location: S3Uri, workdir: Path, max_bytes: int, client: Any) -> Path:
    prefix = location.key if location.key.endswith("/") else location.key + "/"
    objects = {name: S3Uri(location.bucket, prefix + name) for name in ARTIFACT_FILES}
    heads = {name: await _head_if_exists(client, uri) for name, uri in objects.items()}
    pickle = None
    if heads[ADAPTER_WEIGHTS] is None:
        pickle = await _head_if_exists(client, S3Uri(location.bucket, prefix + PICKLE_WEIGHTS))
    if pickle is None and all(head is None for head in heads.values()):
        raise NotFound(
            f"no adapter at s3://{location.bucket}/{prefix}: it holds neither "
            f"{' nor '.join(ARTIFACT_FILES)}"
        )
    # A partial folder is staged as it is: the gate then refuses it with every reason (a bad
    # name too) and audits the refusal, as for an upload. The pickle is never downloaded; an
    # empty file of its name stands for it, which is all the gate looks at.
    present = {name: head for name, head in heads.items() if head is not None}
    if sum(head.size for head in present.values()) > max_bytes:
        raise UploadTooLarge(max_bytes)
    folder = workdir / "adapter"
    folder.mkdir(parents=True)
    try:
        budget = max_bytes  # one limit for the whole folder, as for a two-file upload
        for name, head in present.items():
            path = await _download(client, objects[name], head, directory=workdir, max_bytes=budget)
            budget -= head.size
            path.rename(folder / name)
    except UploadTooLarge:
        shutil.rmtree(folder, ignore_errors=True)
        raise UploadTooLarge(max_bytes) from None  # the whole limit, not what was left of it
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if pickle is not None:
        (folder / PICKLE_WEIGHTS).write_bytes(b"")
    logger.info("staged folder s3://%s/%s (%d bytes)", location.bucket, prefix, max_bytes - budget)
    return folder


async def _head(client: Any, location: S3Uri) -> _Head:
    try:
        response = await asyncio.to_thread(
            client.head_object, Bucket=location.bucket, Key=location.key
        )
    except Exception as exc:
        _refuse(exc, location)
    return _Head(int(response["ContentLength"]), response.get("ETag"))


async def _head_if_exists(client: Any, location: S3Uri) -> _Head | None:
    try:
        return await _head(client, location)
    except NotFound:
        return None


async def _download(
    client: Any, location: S3Uri, head: _Head, *, directory: Path, max_bytes: int
) -> Path:
    """Stream one object into a temp file under directory with upload semantics: UploadTooLarge
    past max_bytes, nothing left behind on failure."""
    extra = {"IfMatch": head.etag} if head.etag else {}
    try:
        response = await asyncio.to_thread(
            client.get_object, Bucket=location.bucket, Key=location.key, **extra
        )
    except Exception as exc:
        _refuse(exc, location)
    body = response["Body"]
    try:
        received = await receive_stream(
            _chunks(body, location, head.size), directory=directory, max_bytes=max_bytes
        )
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
    return received.path


async def _chunks(body: Any, location: S3Uri, announced: int) -> AsyncIterator[bytes]:
    """The body in CHUNK reads; receive_stream enforces max_bytes on what comes out, and a body
    that ends at another length than HEAD announced is refused at its end."""
    seen = 0
    while chunk := await asyncio.to_thread(body.read, CHUNK):
        seen += len(chunk)
        yield chunk
    if seen != announced:
        raise IngestError(
            f"{location} sent {seen} bytes where {announced} were announced; "
            "it changed while being read, try again"
        )


def _refuse(exc: Exception, location: S3Uri) -> NoReturn:
    code = s3_error_code(exc)
    if code in _MISSING_CODES:
        raise NotFound(f"{location} does not exist") from None
    if code in _DENIED_CODES:
        raise PathNotAllowed(
            f"{location}: access denied (missing object, or the gateway may not read it)"
        ) from None
    if code in _CHANGED_CODES:
        raise IngestError(f"{location} changed while being read, try again") from None
    raise exc
