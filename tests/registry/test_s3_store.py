"""S3ArtifactStore against a real S3 protocol server (moto in server mode, real boto3 over HTTP),
beside the fake-client tests in test_store.py; and the client and store factories."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.errors import ArtifactError, ArtifactNotFound
from registry.store import LocalArtifactStore, S3ArtifactStore
from registry.store.s3 import S3Uri, S3UriError, make_s3_client, open_artifact_store, parse_s3_uri
from tests.registry.s3_server import CREDENTIALS, REGION, moto_server, new_bucket, s3_client

NAMES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def s3(endpoint: str) -> Any:
    return s3_client(endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3)


def keys(s3: Any, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def staged(tmp_path: Path, good_adapter: Path) -> Path:
    folder = tmp_path / "staged"
    folder.mkdir()
    for name in [*NAMES, "README.md"]:
        (folder / name).write_bytes((good_adapter / name).read_bytes())
    return folder


async def test_tree_round_trip(s3: Any, bucket: str, tmp_path: Path, good_adapter: Path):
    store = S3ArtifactStore(bucket, prefix="/loraplex/", cache_dir=tmp_path / "cache", client=s3)
    folder = staged(tmp_path, good_adapter)
    digest = await store.put_dir(folder, files=NAMES)
    assert keys(s3, bucket) == [
        f"loraplex/manifests/{digest}.json",
        *(f"loraplex/trees/{digest}/{name}" for name in NAMES),
    ]
    assert await store.put_dir(folder, files=NAMES) == digest  # idempotent
    local = LocalArtifactStore(tmp_path / "local")
    assert await local.put_dir(folder, files=NAMES) == digest  # same address in both stores
    assert await store.exists(digest)

    path = await store.get_path(digest)
    assert path.parent == tmp_path / "cache" / "trees"
    assert sorted(p.name for p in path.iterdir()) == NAMES
    for name in NAMES:
        assert (path / name).read_bytes() == (good_adapter / name).read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["trees"]  # staging cleaned

    assert await store.delete(digest)
    assert keys(s3, bucket) == [] and not path.exists()
    assert not await store.exists(digest)
    assert not await store.delete(digest)
    with pytest.raises(ArtifactNotFound):
        await store.get_path(digest)


async def test_blob_round_trip(s3: Any, bucket: str, tmp_path: Path):
    store = S3ArtifactStore(bucket, cache_dir=tmp_path / "cache", client=s3)
    blob = tmp_path / "card.json"
    blob.write_bytes(b'{"owner": "x"}')
    digest = await store.put_file(blob)
    assert digest == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert keys(s3, bucket) == [f"blobs/{digest}"]
    assert (await store.get_path(digest)).read_bytes() == blob.read_bytes()
    assert await store.delete(digest) and not await store.exists(digest)
    assert keys(s3, bucket) == []


async def test_tampered_object_in_the_bucket_is_refused(
    s3: Any, bucket: str, tmp_path: Path, good_adapter: Path
):
    store = S3ArtifactStore(bucket, cache_dir=tmp_path / "cache", client=s3)
    digest = await store.put_dir(staged(tmp_path, good_adapter), files=NAMES)
    s3.put_object(Bucket=bucket, Key=f"trees/{digest}/adapter_config.json", Body=b'{"r": 64}')
    with pytest.raises(ArtifactError, match="does not match"):
        await store.get_path(digest)
    assert not (tmp_path / "cache" / "trees" / digest).exists()


async def test_half_uploaded_tree_does_not_exist(s3: Any, bucket: str, tmp_path: Path):
    """The manifest is the commit marker: tree files without it are not an artifact."""
    store = S3ArtifactStore(bucket, cache_dir=tmp_path / "cache", client=s3)
    digest = "ab" * 32
    s3.put_object(Bucket=bucket, Key=f"trees/{digest}/adapter_config.json", Body=b"{}")
    assert not await store.exists(digest)
    with pytest.raises(ArtifactNotFound):
        await store.get_path(digest)


# ---------------------------------------------------------------------------- factories


async def test_open_artifact_store_for_an_s3_url(
    endpoint: str,
    s3: Any,
    bucket: str,
    tmp_path: Path,
    good_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """No keys given: boto3's default chain finds them (here in the environment)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    store = open_artifact_store(
        f"s3://{bucket}/prod/artifacts/",
        cache_dir=tmp_path / "cache",
        endpoint_url=endpoint,
        region=REGION,
    )
    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix) == (bucket, "prod/artifacts/")
    digest = await store.put_dir(staged(tmp_path, good_adapter), files=NAMES)
    assert f"prod/artifacts/manifests/{digest}.json" in keys(s3, bucket)
    assert (await store.get_path(digest)).is_dir()


def test_open_artifact_store_for_a_path(tmp_path: Path):
    for location in (tmp_path / "store", str(tmp_path / "store"), "relative/store"):
        store = open_artifact_store(location, cache_dir=tmp_path / "cache")
        assert isinstance(store, LocalArtifactStore) and store.root == Path(location)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("gs://bucket/prefix", ValueError),
        ("file:///var/lib/loraplex", ValueError),
        ("s3://Bad_Bucket/prefix", S3UriError),
        ("s3://bucket/../other", S3UriError),
    ],
)
def test_open_artifact_store_refuses_bad_urls(tmp_path: Path, url: str, error: type[Exception]):
    with pytest.raises(error):
        open_artifact_store(url, cache_dir=tmp_path / "cache", client=object())


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", S3Uri("bucket", "")),
        ("s3://my.bucket-1/", S3Uri("my.bucket-1", "")),
        ("s3://bucket/a/b/", S3Uri("bucket", "a/b/")),
        ("s3://bucket/a/v1.0/adapter.tar.gz", S3Uri("bucket", "a/v1.0/adapter.tar.gz")),
        ("s3://bucket/x=1/(y)!_*'+@,:~-z", S3Uri("bucket", "x=1/(y)!_*'+@,:~-z")),
    ],
)
def test_parse_s3_uri_accepts(uri: str, expected: S3Uri):
    assert parse_s3_uri(uri, require_key=False) == expected


def test_make_s3_client_wants_both_keys_or_neither():
    with pytest.raises(ValueError, match="both"):
        make_s3_client(access_key_id="only-the-id")
    with pytest.raises(ValueError, match="both"):
        make_s3_client(secret_access_key="only-the-secret")


def test_missing_boto3_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=r"loraplex\[s3\]"):
        make_s3_client()
    with pytest.raises(ImportError, match=r"loraplex\[s3\]"):
        open_artifact_store("s3://bucket/prefix", cache_dir=tmp_path)
    lazy = S3ArtifactStore("bucket", cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"loraplex\[s3\]"):
        _ = lazy.client


async def test_a_local_copy_can_be_listed_and_dropped_while_the_object_stays(
    s3: Any, bucket: str, tmp_path: Path, good_adapter: Path
):
    writer = S3ArtifactStore(bucket, cache_dir=tmp_path / "writer", client=s3)
    reader = S3ArtifactStore(bucket, cache_dir=tmp_path / "reader", client=s3)
    digest = await writer.put_dir(staged(tmp_path, good_adapter), files=NAMES)
    assert await reader.local_copies() == set()
    local = await reader.get_path(digest)
    assert await reader.local_copies() == {digest}
    await reader.drop_local_copy(digest)
    assert not local.exists() and await reader.local_copies() == set()
    assert await reader.exists(digest)  # only the copy went
    assert (await reader.get_path(digest)).is_dir()  # downloaded again on the next use
