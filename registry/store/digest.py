"""Content addresses. A file's digest is the sha256 of its bytes. A folder's (a "tree") is the
sha256 of its manifest: for each file, sorted by name as UTF-8 bytes, the line
`name ‖ 0x00 ‖ size in decimal ‖ 0x00 ‖ sha256 hex ‖ "\\n"`. Trees are flat (no sub-folders):
an adapter artifact is adapter_config.json plus adapter_model.safetensors.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from registry.errors import ArtifactError

CHUNK = 4 * 1024 * 1024
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str


def is_digest(name: str) -> bool:
    return bool(_DIGEST.fullmatch(name))


def check_digest(digest: str) -> str:
    """Refuse anything but 64 lower-case hex digits: digests become path segments and keys."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ArtifactError(f"not a sha256 digest: {str(digest)[:80]!r}")
    return digest


def check_file_name(name: str) -> str:
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        raise ArtifactError(f"artifact file name {name[:80]!r} is not allowed")
    return name


def tree_digest(entries: Mapping[str, Entry]) -> str:
    manifest = b"".join(
        name.encode() + b"\0" + str(e.size).encode() + b"\0" + e.sha256.encode() + b"\n"
        for name, e in sorted(entries.items(), key=lambda item: item[0].encode())
    )
    return hashlib.sha256(manifest).hexdigest()


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file without following a symlink at its last component."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:  # ELOOP is what a symlink at the last component gives
        raise ArtifactError(f"cannot open {path.name} as a regular file: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def copy_hashing(src: Path, dst: Path) -> Entry:
    """Copy src to a new file dst, hashing what was written; fsync so a crash never leaves a
    renamed-but-empty object behind."""
    digest = hashlib.sha256()
    size = 0
    with open_regular(src) as source, dst.open("xb") as target:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            target.write(chunk)
            size += len(chunk)
        target.flush()
        os.fsync(target.fileno())
    return Entry(size, digest.hexdigest())


def hash_file(path: Path) -> Entry:
    digest = hashlib.sha256()
    size = 0
    with open_regular(path) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Entry(size, digest.hexdigest())


def list_tree_files(src: Path) -> list[str]:
    """Top-level regular files of src; symlinks or special files make the folder unacceptable."""
    names = []
    for entry in src.iterdir():
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{entry.name} is a symlink or special file")
        names.append(entry.name)
    return sorted(names)
