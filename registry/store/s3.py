"""Content-addressed store on S3 or any S3-compatible service (MinIO, R2, Ceph RGW).

Keys under `prefix`: `trees/<digest>/<file>` for folder contents, `manifests/<digest>.json`
listing a tree's files (written last, deleted first: it is the commit marker, so `exists` never
reports a half-uploaded tree), and `blobs/<digest>` for single files. `get_path` downloads into a
local cache and checks every digest before the folder becomes visible there; concurrent calls for
one digest share one download.

boto3 is imported only when no client is given (the optional `s3` extra). The client must offer
upload_file, download_file, put_object, get_object, head_object and delete_object.

Also here: `make_s3_client` (a boto3 client from plain settings), `open_artifact_store` (a local
path or an `s3://bucket/prefix` URL → a store) and, re-exported from registry/store/s3_uri.py,
`parse_s3_uri` (strict `s3://bucket/key` syntax).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from registry.errors import ArtifactError, ArtifactNotFound
from registry.store.base import ArtifactStore
from registry.store.digest import (
    Entry,
    check_digest,
    check_file_name,
    hash_file,
    is_digest,
    list_tree_files,
    tree_digest,
)
from registry.store.local import LocalArtifactStore
from registry.store.s3_uri import S3Uri, S3UriError, check_bucket_name, parse_s3_uri

__all__ = [  # the URI helpers live in s3_uri; importers of this module keep finding them here
    "S3ArtifactStore",
    "S3Uri",
    "S3UriError",
    "check_bucket_name",
    "make_s3_client",
    "open_artifact_store",
    "parse_s3_uri",
    "s3_error_code",
]

MAX_MANIFEST_BYTES = 1024 * 1024
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Staging folders (downloads, deletions) are removed by whoever made them; one older than this
# was left by a process killed meanwhile, and is swept when a store opens the cache.
STALE_STAGING_S = 3600.0
_STAGING_PREFIX = ".tmp-"


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (or look-alike); None for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return None if code is None else str(code)


def _is_missing(exc: Exception) -> bool:
    return s3_error_code(exc) in _MISSING_CODES


def _boto3() -> ModuleType:
    try:
        import boto3
    except ImportError as exc:
        raise ImportError(
            "S3 support needs boto3, which is not installed: pip install 'loraplex[s3]'"
        ) from exc
    return boto3


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
) -> Any:
    """A boto3 S3 client. Without keys, boto3's default chain decides (environment, shared
    config, instance or pod role). A custom endpoint (MinIO, Ceph, moto) gets path-style
    addressing, which those servers expect."""
    if (access_key_id is None) != (secret_access_key is None):
        raise ValueError("give both the S3 access key id and its secret, or neither")
    boto3 = _boto3()
    from botocore.config import Config  # installed with boto3

    config = Config(
        region_name=region,
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        aws_session_token=session_token,
        config=config,
    )


def open_artifact_store(
    url_or_path: str | Path,
    *,
    cache_dir: Path,
    endpoint_url: str | None = None,
    region: str | None = None,
    client: Any = None,
) -> ArtifactStore:
    """A LocalArtifactStore for a path, an S3ArtifactStore for `s3://bucket[/prefix]`.

    The S3 client is built here (not on first use), so a missing boto3 fails at startup."""
    text = str(url_or_path)
    if isinstance(url_or_path, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        if not text.startswith("s3://"):
            raise ValueError(f"unsupported artifact store URL {text[:80]!r}: use a path or s3://")
        location = parse_s3_uri(text, require_key=False)
        if client is None:
            client = make_s3_client(endpoint_url=endpoint_url, region=region)
        return S3ArtifactStore(
            location.bucket, prefix=location.key, cache_dir=cache_dir, client=client
        )
    return LocalArtifactStore(Path(url_or_path))


class S3ArtifactStore:
    def __init__(
        self,
        bucket: str,
        *,
        cache_dir: Path,
        prefix: str = "",
        client: Any = None,
        **client_kwargs: Any,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache_dir = Path(cache_dir)
        self._client = client
        self._client_kwargs = client_kwargs  # e.g. endpoint_url, region_name
        # digest → its download in progress, per event loop: the first request for a cold
        # adapter downloads it, the others arriving meanwhile wait for that one download.
        self._downloads: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Future[Path]] = {}
        self._sweep_staging()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _boto3().client("s3", **self._client_kwargs)
        return self._client

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    async def put_file(self, path: Path) -> str:
        return await asyncio.to_thread(self._put_file, Path(path))

    async def put_dir(self, path: Path, *, files: Sequence[str] | None = None) -> str:
        return await asyncio.to_thread(self._put_dir, Path(path), files)

    async def exists(self, digest: str) -> bool:
        check_digest(digest)
        return await asyncio.to_thread(self._exists, digest)

    async def get_path(self, digest: str) -> Path:
        check_digest(digest)
        key = (asyncio.get_running_loop(), digest)
        download = self._downloads.get(key)
        if download is None:
            download = asyncio.ensure_future(asyncio.to_thread(self._get_path, digest))
            self._downloads[key] = download

            def done(finished: asyncio.Future[Path]) -> None:
                del self._downloads[key]
                if not finished.cancelled():
                    finished.exception()  # its waiters may all be gone: not "never retrieved"

            download.add_done_callback(done)
        # Shielded: a waiter that gives up (a client hung up) does not cancel the others' copy.
        return await asyncio.shield(download)

    async def delete(self, digest: str) -> bool:
        check_digest(digest)
        return await asyncio.to_thread(self._delete, digest)

    async def local_copies(self) -> set[str]:
        return await asyncio.to_thread(self._local_copies)

    async def drop_local_copy(self, digest: str) -> None:
        check_digest(digest)
        await asyncio.to_thread(self._drop_local_copy, digest)

    def _local_copies(self) -> set[str]:
        found: set[str] = set()
        for kind in ("trees", "blobs"):
            folder = self.cache_dir / kind
            if folder.is_dir():
                found.update(p.name for p in folder.iterdir() if is_digest(p.name))
        return found

    def _drop_local_copy(self, digest: str) -> None:
        tree = self.cache_dir / "trees" / digest
        if tree.is_dir():
            # Renamed away first (one atomic step), so a concurrent get_path either finds the
            # whole folder or none and downloads it again: never a half-deleted one.
            doomed = self._staging()
            with contextlib.suppress(FileNotFoundError):  # a concurrent drop got it first
                os.rename(tree, doomed / "doomed")
            shutil.rmtree(doomed, ignore_errors=True)
        (self.cache_dir / "blobs" / digest).unlink(missing_ok=True)

    def _staging(self) -> Path:
        """A new folder beside the cache's trees (same file system: publishing is a rename)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=_STAGING_PREFIX))

    def _sweep_staging(self) -> None:
        if not self.cache_dir.is_dir():
            return
        cutoff = time.time() - STALE_STAGING_S
        for folder in self.cache_dir.glob(f"{_STAGING_PREFIX}*"):
            with contextlib.suppress(OSError):  # removed meanwhile by a process sharing the cache
                if folder.lstat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)

    def _head(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise

    def _exists(self, digest: str) -> bool:
        """The whole object: for a tree, its manifest and every file it lists. A delete
        racing a put of the same files (the registration stores them before it locks) can
        leave the manifest of the put with the delete's removals of its files behind it."""
        entries = self._manifest(digest)
        if entries is not None:
            return all(self._head(self._key("trees", digest, name)) for name in entries)
        return self._head(self._key("blobs", digest))

    def _put_file(self, src: Path) -> str:
        entry = hash_file(src)
        key = self._key("blobs", entry.sha256)
        if not self._head(key):
            self.client.upload_file(str(src), self.bucket, key)
        return entry.sha256

    def _put_dir(self, src: Path, files: Sequence[str] | None) -> str:
        names = [check_file_name(n) for n in (files if files is not None else list_tree_files(src))]
        if not names:
            raise ArtifactError(f"{src} has no files to store")
        entries = {name: hash_file(src / name) for name in names}
        digest = tree_digest(entries)
        manifest_key = self._key("manifests", f"{digest}.json")
        if self._head(manifest_key) and self._exists(digest):
            return digest
        for name in names:  # a tree whose files a racing delete removed is stored again too
            self.client.upload_file(str(src / name), self.bucket, self._key("trees", digest, name))
        manifest = {n: {"size": e.size, "sha256": e.sha256} for n, e in entries.items()}
        self.client.put_object(
            Bucket=self.bucket, Key=manifest_key, Body=json.dumps({"files": manifest}).encode()
        )
        return digest

    def _manifest(self, digest: str) -> dict[str, Entry] | None:
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._key("manifests", f"{digest}.json")
            )
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise
        raw = response["Body"].read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"manifest of {digest} is too large")
        files = json.loads(raw)["files"]
        entries = {
            check_file_name(n): Entry(int(v["size"]), str(v["sha256"])) for n, v in files.items()
        }
        if tree_digest(entries) != digest:
            raise ArtifactError(f"manifest of {digest} does not match its digest")
        return entries

    def _get_path(self, digest: str) -> Path:
        tree = self.cache_dir / "trees" / digest
        blob = self.cache_dir / "blobs" / digest
        if tree.is_dir():
            return tree
        if blob.is_file():
            return blob
        staging = self._staging()
        try:
            entries = self._manifest(digest)
            if entries is not None:
                for name, expected in entries.items():
                    self._download(self._key("trees", digest, name), staging / name, expected)
                return self._publish(staging, tree)
            if not self._head(self._key("blobs", digest)):
                raise ArtifactNotFound(f"artifact {digest} is not in the store")
            self._download(self._key("blobs", digest), staging / "blob", None, digest)
            return self._publish(staging / "blob", blob)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, key: str, dst: Path, expected: Entry | None, sha: str = "") -> None:
        self.client.download_file(self.bucket, key, str(dst))
        got = hash_file(dst)
        if (expected is not None and got != expected) or (sha and got.sha256 != sha):
            raise ArtifactError(f"downloaded {key} does not match its digest")

    @staticmethod
    def _publish(staged: Path, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError:
            if not final.exists():
                raise
        return final

    def _delete(self, digest: str) -> bool:
        self._drop_local_copy(digest)
        entries = self._manifest(digest)
        if entries is not None:
            # Manifest first: from here on the tree no longer exists for readers.
            self.client.delete_object(
                Bucket=self.bucket, Key=self._key("manifests", f"{digest}.json")
            )
            for name in entries:
                self.client.delete_object(Bucket=self.bucket, Key=self._key("trees", digest, name))
            return True
        key = self._key("blobs", digest)
        if not self._head(key):
            return False
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return True
