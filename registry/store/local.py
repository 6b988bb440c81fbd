"""Content-addressed store on the local file system.

Layout under root: `trees/ab/<digest>/<files>` for folders, `blobs/ab/<digest>` for files, and
`tmp/` for staging on the same file system, so publishing is one atomic rename: readers never
see half an object, and two writers of the same content both end with the same single copy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from registry.errors import ArtifactError, ArtifactNotFound
from registry.store.digest import (
    Entry,
    check_digest,
    check_file_name,
    copy_hashing,
    list_tree_files,
    tree_digest,
)


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _tree(self, digest: str) -> Path:
        return self.root / "trees" / digest[:2] / digest

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def _staging(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=tmp))

    async def put_file(self, path: Path) -> str:
        return await asyncio.to_thread(self._put_file, Path(path))

    async def put_dir(self, path: Path, *, files: Sequence[str] | None = None) -> str:
        return await asyncio.to_thread(self._put_dir, Path(path), files)

    async def exists(self, digest: str) -> bool:
        check_digest(digest)
        return self._tree(digest).is_dir() or self._blob(digest).is_file()

    async def get_path(self, digest: str) -> Path:
        check_digest(digest)
        for candidate in (self._tree(digest), self._blob(digest)):
            if candidate.exists():
                return candidate
        raise ArtifactNotFound(f"artifact {digest} is not in the store")

    async def delete(self, digest: str) -> bool:
        check_digest(digest)
        return await asyncio.to_thread(self._delete, digest)

    async def local_copies(self) -> set[str]:
        return set()  # the store is this folder: nothing is copied beside it

    async def drop_local_copy(self, digest: str) -> None:
        check_digest(digest)

    def _put_file(self, src: Path) -> str:
        staging = self._staging()
        try:
            entry = copy_hashing(src, staging / "blob")
            self._publish(staging / "blob", self._blob(entry.sha256))
            return entry.sha256
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _put_dir(self, src: Path, files: Sequence[str] | None) -> str:
        names = list(files) if files is not None else list_tree_files(src)
        if not names:
            raise ArtifactError(f"{src} has no files to store")
        staging = self._staging()
        try:
            tree = staging / "tree"
            tree.mkdir()
            # Hash the copy, not the source: the digest then names exactly the stored bytes even
            # if someone rewrites the source meanwhile.
            entries: dict[str, Entry] = {
                check_file_name(name): copy_hashing(src / name, tree / name) for name in names
            }
            digest = tree_digest(entries)
            self._publish(tree, self._tree(digest))
            return digest
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _publish(staged: Path, final: Path) -> None:
        if final.exists():
            return  # same content already stored
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError:
            if not final.exists():  # lost a race to an identical writer otherwise
                raise

    def _delete(self, digest: str) -> bool:
        blob = self._blob(digest)
        if blob.is_file():
            blob.unlink()
            return True
        tree = self._tree(digest)
        if not tree.is_dir():
            return False
        # Rename first so a concurrent get_path never hands out a half-deleted folder.
        doomed = self._staging() / "doomed"
        os.rename(tree, doomed)
        shutil.rmtree(doomed.parent, ignore_errors=True)
        return True
