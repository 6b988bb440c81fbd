"""S3ArtifactStore's local cache under concurrency, against a real S3 protocol server (moto):
concurrent first requests for one cold adapter download it once, a caller giving up does not
cancel the others' download, dropping a local copy never exposes a half-deleted folder, and
staging folders a killed process left behind are swept when a store opens the cache."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.store import S3ArtifactStore
from registry.store.s3 import STALE_STAGING_S
from tests.registry.s3_server import moto_server, new_bucket, s3_client

NAMES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    with moto_server() as endpoint:
        yield s3_client(endpoint)


class CountingClient:
    """The real boto3 client, counting downloads; each waits for `release` when it is set up,
    so that every caller is known to be waiting before the first download ends."""

    def __init__(self, client: Any):
        self._client = client
        self.downloads: list[str] = []
        self.release: threading.Event | None = None

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        self.downloads.append(key)
        if self.release is not None:
            assert self.release.wait(timeout=30)
        self._client.download_file(bucket, key, filename)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def stored_tree(s3: Any, tmp_path: Path, good_adapter: Path) -> tuple[str, str]:
    """A bucket holding the good adapter's tree: the bucket and the tree's digest."""
    bucket = new_bucket(s3)
    uploader = S3ArtifactStore(bucket, cache_dir=tmp_path / "uploader", client=s3)
    return bucket, await uploader.put_dir(good_adapter, files=NAMES)


async def until(predicate: Any) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def test_concurrent_first_requests_download_once(s3, tmp_path, good_adapter):
    bucket, digest = await stored_tree(s3, tmp_path, good_adapter)
    client = CountingClient(s3)
    client.release = threading.Event()
    replica = S3ArtifactStore(bucket, cache_dir=tmp_path / "cache", client=client)
    callers = [asyncio.ensure_future(replica.get_path(digest)) for _ in range(8)]
    # All eight ran up to their first wait before any download thread got this far.
    await until(lambda: len(client.downloads) == 1)  # the first file of the one download
    client.release.set()
    paths = await asyncio.gather(*callers)
    assert set(paths) == {tmp_path / "cache" / "trees" / digest}
    assert sorted(client.downloads) == sorted(f"trees/{digest}/{name}" for name in NAMES)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["trees"]
    await replica.get_path(digest)  # cached now: no download, no download in flight kept
    assert len(client.downloads) == len(NAMES)


async def test_a_caller_giving_up_does_not_cancel_the_others(s3, tmp_path, good_adapter):
    bucket, digest = await stored_tree(s3, tmp_path, good_adapter)
    client = CountingClient(s3)
    client.release = threading.Event()
    replica = S3ArtifactStore(bucket, cache_dir=tmp_path / "cache", client=client)
    first = asyncio.ensure_future(replica.get_path(digest))
    second = asyncio.ensure_future(replica.get_path(digest))
    await until(lambda: len(client.downloads) >= 1)
    first.cancel()  # its client hung up
    client.release.set()
    assert (await second) == tmp_path / "cache" / "trees" / digest
    assert first.cancelled()
    assert sorted(p.name for p in (await second).iterdir()) == NAMES


async def test_dropping_a_local_copy_never_exposes_a_half_deleted_folder(
    s3, tmp_path, good_adapter, monkeypatch
):
    bucket, digest = await stored_tree(s3, tmp_path, good_adapter)
    replica = S3ArtifactStore(bucket, cache_dir=tmp_path / "cache", client=s3)
    tree = await replica.get_path(digest)
    seen: list[list[str]] = []
    real_rmtree = shutil.rmtree

    def rmtree_racing_a_reader(path: Any, *args: Any, **kwargs: Any) -> None:
        # Half way through the deletion (one file gone), a request asks for the adapter.
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
            seen.append(sorted(p.name for p in replica._get_path(digest).iterdir()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_racing_a_reader)
    await replica.drop_local_copy(digest)
    assert seen == [NAMES]  # the reader got the whole adapter (downloaded again), not a half
    assert sorted(p.name for p in tree.iterdir()) == NAMES


def test_stale_staging_folders_are_swept_when_a_store_opens(tmp_path):
    cache = tmp_path / "cache"
    (cache / "trees" / ("ab" * 32)).mkdir(parents=True)
    old, fresh = cache / ".tmp-killed", cache / ".tmp-in-progress"
    for folder in (old, fresh):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "adapter_model.safetensors").write_bytes(b"x" * 16)
    long_ago = time.time() - STALE_STAGING_S - 60
    os.utime(old, (long_ago, long_ago))
    S3ArtifactStore("loraplex-test", cache_dir=cache, client=object())
    assert sorted(p.name for p in cache.iterdir()) == [".tmp-in-progress", "trees"]
    S3ArtifactStore("loraplex-test", cache_dir=tmp_path / "not-yet", client=object())  # no cache


async def test_a_put_racing_a_delete_of_the_same_files_is_seen_and_stored_again(tmp_path):
    """The registration stores its files before it locks; a delete of the same tree that
    removed the manifest, let the put upload everything, then removed the tree files left a
    manifest without files: exists() said yes, the version committed, every load failed."""
    import threading

    from registry.store import S3ArtifactStore
    from tests.registry.s3_server import moto_server, new_bucket, s3_client

    names = ["adapter_config.json", "adapter_model.safetensors"]
    src = tmp_path / "adapter"
    src.mkdir()
    (src / names[0]).write_text('{"r": 8}')
    (src / names[1]).write_bytes(b"w" * 4096)

    class PausingClient:
        def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
            self._client, self.hook = client, None

        def delete_object(self, **kw):  # type: ignore[no-untyped-def]
            response = self._client.delete_object(**kw)
            if self.hook and kw["Key"].startswith("manifests/"):
                self.hook()  # between the manifest and the tree files
            return response

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self._client, name)

    with moto_server() as endpoint:
        s3 = s3_client(endpoint)
        bucket = new_bucket(s3)
        client = PausingClient(s3)
        deleter = S3ArtifactStore(bucket, cache_dir=tmp_path / "c1", client=client)
        digest = await deleter.put_dir(src, files=names)
        manifest_gone, put_done = threading.Event(), threading.Event()

        def pause() -> None:
            manifest_gone.set()
            put_done.wait(10)

        client.hook = pause
        deleting = asyncio.ensure_future(deleter.delete(digest))
        await asyncio.to_thread(manifest_gone.wait, 10)
        registrar = S3ArtifactStore(bucket, cache_dir=tmp_path / "c2", client=s3)
        assert await registrar.put_dir(src, files=names) == digest
        put_done.set()
        await deleting
        assert not await registrar.exists(digest)  # what the registration checks under lock
        assert await registrar.put_dir(src, files=names) == digest  # ... and so stores again
        reader = S3ArtifactStore(bucket, cache_dir=tmp_path / "c3", client=s3)
        assert sorted(p.name for p in (await reader.get_path(digest)).iterdir()) == names
