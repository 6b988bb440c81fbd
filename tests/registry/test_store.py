"""Both artifact stores behind the one Protocol: local files, and S3 through a fake client that
implements the six boto3 calls the store uses (botocore's 404 shape included)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from registry.errors import ArtifactError, ArtifactNotFound
from registry.store import ArtifactStore, LocalArtifactStore, S3ArtifactStore, tree_digest
from registry.store.digest import Entry


class FakeS3Error(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


class FakeBody:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        return self.data if size < 0 else self.data[:size]


class FakeS3Client:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        self.objects[(bucket, key)] = Path(filename).read_bytes()

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        Path(filename).write_bytes(self._get(bucket, key))

    def put_object(self, *, Bucket: str, Key: str, Body: bytes) -> None:
        self.objects[(Bucket, Key)] = Body

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        return {"Body": FakeBody(self._get(Bucket, Key))}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        return {"ContentLength": len(self._get(Bucket, Key, code="404"))}

    def delete_object(self, *, Bucket: str, Key: str) -> None:
        self.objects.pop((Bucket, Key), None)

    def _get(self, bucket: str, key: str, code: str = "NoSuchKey") -> bytes:
        try:
            return self.objects[(bucket, key)]
        except KeyError:
            raise FakeS3Error(code) from None


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "store")
    return S3ArtifactStore(
        "bucket", prefix="loraplex/", cache_dir=tmp_path / "cache", client=FakeS3Client()
    )


def staged(tmp_path: Path) -> Path:
    folder = tmp_path / "staged"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "README.md").write_text("ignored when files= is given")
    return folder


def expected_tree(folder: Path, names: list[str]) -> str:
    entries = {}
    for name in names:
        data = (folder / name).read_bytes()
        entries[name] = Entry(len(data), hashlib.sha256(data).hexdigest())
    return tree_digest(entries)


async def test_tree_round_trip(any_store: ArtifactStore, tmp_path: Path):
    assert isinstance(any_store, ArtifactStore)
    folder = staged(tmp_path)
    names = ["adapter_config.json", "adapter_model.safetensors"]
    digest = await any_store.put_dir(folder, files=names)
    assert digest == expected_tree(folder, names)
    assert await any_store.put_dir(folder, files=names) == digest  # idempotent
    assert await any_store.exists(digest)
    path = await any_store.get_path(digest)
    assert sorted(p.name for p in path.iterdir()) == names
    assert (path / "adapter_config.json").read_text() == '{"r": 8}'
    assert await any_store.delete(digest)
    assert not await any_store.exists(digest)
    assert not await any_store.delete(digest)
    with pytest.raises(ArtifactNotFound):
        await any_store.get_path(digest)


async def test_blob_round_trip(any_store: ArtifactStore, tmp_path: Path):
    blob = tmp_path / "card.json"
    blob.write_bytes(b'{"owner": "x"}')
    digest = await any_store.put_file(blob)
    assert digest == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert (await any_store.get_path(digest)).read_bytes() == blob.read_bytes()
    assert await any_store.delete(digest) and not await any_store.exists(digest)


async def test_default_file_set_refuses_symlinks(any_store: ArtifactStore, tmp_path: Path):
    folder = staged(tmp_path)
    digest = await any_store.put_dir(folder)  # all top-level regular files
    assert digest == expected_tree(folder, sorted(p.name for p in folder.iterdir()))
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArtifactError, match="symlink"):
        await any_store.put_dir(folder)
    with pytest.raises(ArtifactError):
        await any_store.put_dir(folder, files=["link"])


@pytest.mark.parametrize("digest", ["../../etc", "A" * 64, "abc", "0" * 63 + "/"])
async def test_digests_are_validated(any_store: ArtifactStore, digest: str):
    with pytest.raises(ArtifactError):
        await any_store.get_path(digest)


async def test_s3_cache_is_verified(tmp_path: Path):
    client = FakeS3Client()
    store = S3ArtifactStore("b", cache_dir=tmp_path / "cache", client=client)
    folder = staged(tmp_path)
    digest = await store.put_dir(folder, files=["adapter_config.json"])
    key = ("b", f"trees/{digest}/adapter_config.json")
    client.objects[key] = b'{"r": 64}'  # tampered in the bucket
    with pytest.raises(ArtifactError, match="does not match"):
        await store.get_path(digest)
    assert not (tmp_path / "cache" / "trees" / digest).exists()


async def test_local_store_survives_a_deleted_source(tmp_path: Path):
    store = LocalArtifactStore(tmp_path / "store")
    folder = staged(tmp_path)
    digest = await store.put_dir(folder, files=["adapter_config.json"])
    shutil.rmtree(folder)
    assert (await store.get_path(digest)).joinpath("adapter_config.json").exists()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # staging cleaned up
