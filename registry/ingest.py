"""Getting untrusted adapter uploads onto local disk safely, before the gate looks at them.

Three ways in, all ending in a local folder that `register_adapter_version` takes:

- `receive_stream`: async byte chunks (e.g. FastAPI UploadFile.read(1 MiB) in a loop) go to a
  temp file as they arrive; more than `max_bytes` raises UploadTooLarge. Never held in memory.
- `extract_archive`: a .tar (optionally gz/bz2/xz) or .zip of a PEFT folder, unpacked refusing
  absolute paths, `..`, backslashes, links, devices, sparse and encrypted members, and bounding
  member count and real (decompressed) bytes, so bombs and lying headers stop early. Archive
  metadata is bounded before it is parsed: a tar is decompressed by us and read as a stream
  that refuses a member's headers (pax records, GNU long names, which tarfile reads whole into
  memory) past `max_header_bytes`; a zip's central directory (one object per entry) is sized
  from its end record before zipfile parses it.
- `stage_local_path`: a server-side folder, accepted only if its real path (symlinks resolved)
  lies under one of the allow-listed roots.

`ingest_upload` chains the first two. The caller owns `workdir` and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import AsyncIterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast
from zipfile import _ECD_ENTRIES_TOTAL, _ECD_SIZE, _EndRecData  # type: ignore[attr-defined]

from registry.compat.artifact import ADAPTER_CONFIG
from registry.errors import PathNotAllowed, UnsafeArchive, UploadTooLarge

CHUNK = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 2 * 1024**3
    max_members: int = 64
    max_depth: int = 4
    # One tar member's header blocks (pax records, GNU long names); a zip's central directory.
    max_header_bytes: int = 1024 * 1024

    @classmethod
    def for_upload(cls, max_bytes: int) -> ArchiveLimits:
        """An archive unpacks to at most what an upload may weigh: adapter weights hardly
        compress, so a legitimate archive stays within it and a zip bomb does not."""
        return cls(max_total_bytes=max_bytes, max_member_bytes=max_bytes)


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    size: int
    sha256: str


async def receive_stream(
    chunks: AsyncIterable[bytes], *, directory: Path, max_bytes: int
) -> ReceivedFile:
    """Write chunks to a new temp file in `directory`; raises UploadTooLarge past max_bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="upload-")
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                digest.update(chunk)
                await asyncio.to_thread(handle.write, chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReceivedFile(path, size, digest.hexdigest())


async def ingest_upload(
    chunks: AsyncIterable[bytes],
    *,
    workdir: Path,
    max_bytes: int,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Receive an archive upload and unpack it under workdir; returns the PEFT folder. Unpacked,
    it may not exceed `max_bytes` either (`ArchiveLimits.for_upload`) unless `limits` say."""
    received = await receive_stream(chunks, directory=workdir, max_bytes=max_bytes)
    limits = limits or ArchiveLimits.for_upload(max_bytes)
    try:
        return await asyncio.to_thread(
            extract_archive, received.path, workdir / "extracted", limits=limits
        )
    finally:
        received.path.unlink(missing_ok=True)


def extract_archive(archive: Path, dest: Path, *, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Unpack a tar or zip into the new folder dest; returns the folder holding the adapter.

    Raises UnsafeArchive and leaves nothing behind on any violation."""
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, limits)
        elif _is_tar(archive):
            _extract_tar(archive, dest, limits)
        else:
            raise UnsafeArchive("the upload is neither a tar nor a zip archive")
    except UnsafeArchive:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (
        OSError,
        EOFError,
        tarfile.TarError,
        zipfile.BadZipFile,
        RuntimeError,
        zlib.error,
        lzma.LZMAError,
    ) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        # An OSError's text names server paths (the staging folder): its reason only.
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnsafeArchive(f"the archive is corrupt or unreadable: {detail}") from None
    return find_adapter_root(dest)


def find_adapter_root(folder: Path) -> Path:
    """folder itself, or its single top-level sub-folder when the archive wrapped one."""
    if (folder / ADAPTER_CONFIG).exists():
        return folder
    children = [c for c in folder.iterdir() if c.name != "__MACOSX"]
    if len(children) == 1 and children[0].is_dir() and (children[0] / ADAPTER_CONFIG).exists():
        return children[0]
    return folder  # the gate then reports exactly which files are missing


def _member_path(name: str, dest: Path, limits: ArchiveLimits) -> Path | None:
    if not name or "\\" in name or "\0" in name or name.startswith("/") or _DRIVE.match(name):
        raise UnsafeArchive(f"member {name[:100]!r} has an absolute or non-POSIX path")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member {name[:100]!r} points outside the archive ('..')")
    if len(parts) > limits.max_depth:
        raise UnsafeArchive(f"member {name[:100]!r} is nested deeper than {limits.max_depth}")
    return dest.joinpath(*parts) if parts else None


class _Budget:
    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.total = 0
        self.members = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchive(f"the archive has more than {self.limits.max_members} members")

    def copy(self, source: IO[bytes], target: Path, declared: int, name: str) -> None:
        if declared > self.limits.max_member_bytes:
            raise UnsafeArchive(f"member {name!r} is larger than {self.limits.max_member_bytes}")
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        # Count real bytes, not header sizes: compressed members can claim anything.
        with target.open("xb") as handle:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                self.total += len(chunk)
                if written > self.limits.max_member_bytes:
                    raise UnsafeArchive(f"member {name!r} expands past the member limit")
                if self.total > self.limits.max_total_bytes:
                    raise UnsafeArchive(
                        f"the archive expands past {self.limits.max_total_bytes} bytes"
                    )
                handle.write(chunk)


def _open_decompressed(handle: io.BufferedIOBase) -> io.BufferedIOBase:
    """The tar inside `handle`, decompressed by magic number (gzip, bzip2, xz) or as it is;
    decompressing here rather than in tarfile lets `_MeteredStream` count the real bytes."""
    magic = handle.read(6)
    handle.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=handle, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(handle)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(cast(IO[bytes], handle))
    return handle


def _is_tar(archive: Path) -> bool:
    """Whether the first 512 decompressed bytes are a valid tar header (what
    tarfile.is_tarfile decides too, without reading the first member's data into memory)."""
    try:
        with archive.open("rb") as handle, _open_decompressed(handle) as stream:
            block = stream.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError):
        return False
    return True


class _MeteredStream:
    """The decompressed tar as tarfile reads it, in stream mode ("r|"), with two caps: all
    bytes (the data budget plus every member's headers), and the bytes read while tarfile
    looks for the next member. That second phase is where it reads a pax record or a GNU long
    name whole into memory, so a 255 KB .tar.gz cannot make it hold 256 MB."""

    def __init__(self, source: io.BufferedIOBase, limits: ArchiveLimits) -> None:
        self._source = source
        # tarfile reads ahead one record; the end-of-archive blocks come on top
        self._header_limit = limits.max_header_bytes + 2 * tarfile.RECORDSIZE
        self._total_limit = limits.max_total_bytes + (limits.max_members + 1) * self._header_limit
        self._max_header_bytes = limits.max_header_bytes
        self._max_total_bytes = limits.max_total_bytes
        self.bytes_read = 0
        self._in_headers = 0  # bytes read since tarfile began looking for a member; -1: data

    def headers(self) -> None:
        self._in_headers = 0

    def data(self) -> None:
        self._in_headers = -1

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size if 0 <= size <= CHUNK else CHUNK)
        self.bytes_read += len(chunk)
        if self._in_headers >= 0:
            self._in_headers += len(chunk)
            if self._in_headers > self._header_limit:
                raise UnsafeArchive(
                    f"a member's headers (pax or GNU long name) exceed {self._max_header_bytes}"
                    " bytes"
                )
        if self.bytes_read > self._total_limit:
            raise UnsafeArchive(f"the archive expands past {self._max_total_bytes} bytes")
        return chunk


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(limits)
    with ExitStack() as stack:
        stream = _MeteredStream(
            stack.enter_context(_open_decompressed(stack.enter_context(archive.open("rb")))),
            limits,
        )
        # opening reads the first member's headers: the stream starts in the header phase
        tar = stack.enter_context(tarfile.open(fileobj=cast(Any, stream), mode="r|"))
        while (member := tar.next()) is not None:
            stream.data()
            _extract_member(tar, member, dest, limits, budget)
            stream.headers()


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    dest: Path,
    limits: ArchiveLimits,
    budget: _Budget,
) -> None:
    budget.member()
    target = _member_path(member.name, dest, limits)
    if member.isdir():
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
        return
    if not member.isreg() or member.issparse() or target is None:
        raise UnsafeArchive(f"member {member.name[:100]!r} is a link, device or other special file")
    source = tar.extractfile(member)
    if source is None:
        raise UnsafeArchive(f"member {member.name[:100]!r} has no data")
    with source:
        budget.copy(source, target, member.size, member.name)


def _check_zip_directory(archive: Path, limits: ArchiveLimits) -> None:
    """Refuse a zip whose central directory is too big before zipfile reads it: it reads the
    whole directory and builds one ZipInfo per entry (a 17 MB zip of 200,000 empty entries
    takes 110 MB) before the member budget sees the first. zipfile walks the directory by the
    size its end record gives, which therefore bounds the entries however many it claims."""
    with archive.open("rb") as handle:
        end = _EndRecData(handle)
    if end is None:
        raise UnsafeArchive("the zip archive has no end-of-central-directory record")
    if end[_ECD_ENTRIES_TOTAL] > limits.max_members:
        raise UnsafeArchive(f"the archive has more than {limits.max_members} members")
    if end[_ECD_SIZE] > limits.max_header_bytes:
        raise UnsafeArchive(
            f"the zip's central directory is {end[_ECD_SIZE]} bytes; the limit is "
            f"{limits.max_header_bytes}"
        )


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(limits)
    _check_zip_directory(archive, limits)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member()
            target = _member_path(info.filename, dest, limits)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode) or (
                mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR)
            ):
                raise UnsafeArchive(f"member {info.filename[:100]!r} is a link or special file")
            if info.flag_bits & 0x1:
                raise UnsafeArchive(f"member {info.filename[:100]!r} is encrypted")
            if info.is_dir():
                if target is not None:
                    target.mkdir(parents=True, exist_ok=True)
                continue
            if target is None:
                raise UnsafeArchive(f"member {info.filename[:100]!r} has no usable name")
            with zf.open(info) as source:
                budget.copy(source, target, info.file_size, info.filename)


def stage_local_path(path: str | Path, *, allowed_roots: Sequence[Path]) -> Path:
    """The real path of a server-side adapter folder, if it lies under an allowed root."""
    candidate = Path(path)
    if not candidate.is_absolute():
        raise PathNotAllowed(f"{str(path)[:200]!r} must be an absolute path")
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PathNotAllowed(f"{str(path)[:200]!r} does not exist") from None
    roots = [Path(root).resolve() for root in allowed_roots]
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise PathNotAllowed(f"{str(path)[:200]!r} is outside the allowed adapter roots")
    if not real.is_dir():
        raise PathNotAllowed(f"{str(path)[:200]!r} is not a folder")
    return real
