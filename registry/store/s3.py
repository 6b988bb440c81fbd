"""Content-addressed store on S3 or any S3-compatible service (MinIO, R2, Ceph RGW).

Keys under `prefix`: `trees/<digest>/<file>` for folder contents, `manifests/<digest>.json`
listing a tree's files (written last, deleted first: it is the commit marker, so `exists` never
reports a half-uploaded tree), and `blobs/<digest>` for single files. `get_path` downloads into a
local cache and checks every digest before the folder becomes visible there.

boto3 is imported only when no client is given (the optional `s3` extra). The client must offer
upload_file, download_file, put_object, get_object, head_object and delete_object.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry.errors import ArtifactError, ArtifactNotFound
from registry.store.digest import (
    Entry,
    check_digest,
    check_file_name,
    hash_file,
    list_tree_files,
    tree_digest,
)

MAX_MANIFEST_BYTES = 1024 * 1024
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def _is_missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in _MISSING_CODES


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

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3  # optional dependency: loraplex[s3]

            self._client = boto3.client("s3", **self._client_kwargs)
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
        return await asyncio.to_thread(self._get_path, digest)

    async def delete(self, digest: str) -> bool:
        check_digest(digest)
        return await asyncio.to_thread(self._delete, digest)

    def _head(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise

    def _exists(self, digest: str) -> bool:
        return self._head(self._key("manifests", f"{digest}.json")) or self._head(
            self._key("blobs", digest)
        )

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
        if self._head(manifest_key):
            return digest
        for name in names:
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
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".tmp-"))
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
        shutil.rmtree(self.cache_dir / "trees" / digest, ignore_errors=True)
        (self.cache_dir / "blobs" / digest).unlink(missing_ok=True)
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
