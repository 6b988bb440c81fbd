"""The artifact store interface: immutable objects named by their sha256 (see store.digest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class ArtifactStore(Protocol):
    """Content-addressed storage. Putting the same content twice is a no-op returning the same
    digest; objects are never modified, only deleted (by the service, once unreferenced)."""

    async def put_file(self, path: Path) -> str:
        """Store one local file; returns its sha256."""
        ...

    async def put_dir(self, path: Path, *, files: Sequence[str] | None = None) -> str:
        """Store the named top-level files of a staged local folder (default: all regular files)
        as one tree; returns the tree digest."""
        ...

    async def exists(self, digest: str) -> bool:
        """Whether the whole object is there (a tree: its manifest and every file)."""
        ...

    async def get_path(self, digest: str) -> Path:
        """A local path to load from (a folder for trees, a file for blobs). Remote stores
        download into a verified local cache first. Raises ArtifactNotFound."""
        ...

    async def delete(self, digest: str) -> bool:
        """Remove the object; False when it was not there."""
        ...

    async def local_copies(self) -> set[str]:
        """Digests this process holds a local copy of beside the store itself (a remote store's
        download cache); empty for a store that is local already."""
        ...

    async def drop_local_copy(self, digest: str) -> None:
        """Remove this process's local copy of `digest`, if any; the stored object stays."""
        ...
