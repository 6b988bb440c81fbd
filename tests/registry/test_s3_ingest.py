"""Registration from s3:// URIs: real peft adapters put on a real S3 protocol server (moto in
server mode, plain HTTP, real boto3), fetched by stage_s3_uri and passed through the gate. The
streaming guards, which no honest server can trip, run on a fake body that lies."""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.compat import (
    BaseModelFingerprint,
    EngineLimits,
    ProblemCode,
    inspect_adapter,
    run_gate,
)
from registry.compat.artifact import ARTIFACT_FILES
from registry.errors import (
    IngestError,
    NotFound,
    PathNotAllowed,
    UnsafeArchive,
    UploadTooLarge,
)
from registry.ingest import CHUNK
from registry.ingest_s3 import stage_s3_uri
from tests.registry.s3_server import moto_server, new_bucket, s3_client

LIMITS = EngineLimits(max_lora_rank=16)
MiB = 2**20


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    with moto_server() as endpoint:
        yield s3_client(endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3)


def put_folder(s3: Any, bucket: str, prefix: str, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}{path.name}")


def tar_bytes(folder: Path, arcname: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


def zip_bytes(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, arcname=path.name)
    return buffer.getvalue()


class Recording:
    """The real client, with a log of the calls made through it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.client, name)


async def stage(uri: str, client: Any, tmp_path: Path, **options: Any) -> Path:
    options.setdefault("max_bytes", 10 * MiB)
    return await stage_s3_uri(uri, workdir=tmp_path / "work", client=client, **options)


def leftovers(tmp_path: Path) -> list[str]:
    work = tmp_path / "work"
    return sorted(str(p.relative_to(work)) for p in work.rglob("*")) if work.exists() else []


# ---------------------------------------------------------------------------- folders


@pytest.mark.parametrize("slash", ["/", ""], ids=["trailing-slash", "bare-prefix"])
async def test_folder_fetches_exactly_the_two_files_and_passes_the_gate(
    s3: Any,
    bucket: str,
    good_adapter: Path,
    base_fp: BaseModelFingerprint,
    tmp_path: Path,
    slash: str,
):
    put_folder(s3, bucket, "team/adapters/v1/", good_adapter)
    s3.put_object(Bucket=bucket, Key="team/adapters/v1/training_args.bin", Body=b"pickle")
    s3.put_object(Bucket=bucket, Key="team/adapters/v1/sub/adapter_model.bin", Body=b"pickle")
    uri = f"s3://{bucket}/team/adapters/v1{slash}"

    folder = await stage(uri, s3, tmp_path, allowed_buckets=[bucket])

    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)
    for name in ARTIFACT_FILES:
        assert (folder / name).read_bytes() == (good_adapter / name).read_bytes()
    assert run_gate(inspect_adapter(folder), base_fp, LIMITS) == []
    assert leftovers(tmp_path) == ["adapter", *(f"adapter/{n}" for n in sorted(ARTIFACT_FILES))]


async def test_folder_limit_is_the_total_not_per_file(
    s3: Any, bucket: str, good_adapter: Path, tmp_path: Path
):
    put_folder(s3, bucket, "a/", good_adapter)
    sizes = [(good_adapter / name).stat().st_size for name in ARTIFACT_FILES]
    client = Recording(s3)
    with pytest.raises(UploadTooLarge) as error:
        await stage(f"s3://{bucket}/a/", client, tmp_path, max_bytes=sum(sizes) - 1)
    assert error.value.limit == sum(sizes) - 1 and max(sizes) < sum(sizes) - 1
    assert client.calls == ["head_object", "head_object"]  # refused from HEAD alone
    assert leftovers(tmp_path) == []
    folder = await stage(f"s3://{bucket}/a/", s3, tmp_path, max_bytes=sum(sizes))
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)


async def test_bin_only_folder_is_refused_by_the_gate(
    s3: Any,
    bucket: str,
    make_adapter: Callable[..., Path],
    tmp_path: Path,
    base_fp: BaseModelFingerprint,
):
    pickled = make_adapter("pickled", safe=False)
    assert (pickled / "adapter_model.bin").exists()
    put_folder(s3, bucket, "old/", pickled)
    client = Recording(s3)
    folder = await stage(f"s3://{bucket}/old", client, tmp_path)
    assert "get_object" in client.calls  # adapter_config.json only
    assert (folder / "adapter_model.bin").stat().st_size == 0  # never downloaded
    problems = run_gate(inspect_adapter(folder), base_fp, LIMITS)
    assert {p.code for p in problems} == {ProblemCode.PICKLE_WEIGHTS, ProblemCode.MISSING_FILE}
    assert any("safe_serialization=True" in p.message for p in problems)


async def test_folder_without_config_is_refused_by_the_gate(
    s3: Any, bucket: str, good_adapter: Path, tmp_path: Path, base_fp: BaseModelFingerprint
):
    s3.upload_file(
        str(good_adapter / "adapter_model.safetensors"), bucket, "x/adapter_model.safetensors"
    )
    folder = await stage(f"s3://{bucket}/x/", s3, tmp_path)
    assert [(p.code, p.message) for p in run_gate(inspect_adapter(folder), base_fp, LIMITS)] == [
        (ProblemCode.MISSING_FILE, "adapter_config.json is missing")
    ]


# ---------------------------------------------------------------------------- archives


ARCHIVES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("adapter.tar", lambda f: tar_bytes(f, "my-adapter", "w"), "my-adapter"),
    ("adapter.tar.gz", lambda f: tar_bytes(f, "my-adapter", "w:gz"), "my-adapter"),
    ("adapter.TGZ", lambda f: tar_bytes(f, ".", "w:gz"), "extracted"),
    ("adapter.zip", zip_bytes, "extracted"),
]


@pytest.mark.parametrize(("key", "pack", "root"), ARCHIVES, ids=[a[0] for a in ARCHIVES])
async def test_archive_objects_are_unpacked_and_pass_the_gate(
    s3: Any,
    bucket: str,
    good_adapter: Path,
    base_fp: BaseModelFingerprint,
    tmp_path: Path,
    key: str,
    pack: Callable[[Path], bytes],
    root: str,
):
    s3.put_object(Bucket=bucket, Key=f"releases/{key}", Body=pack(good_adapter))
    folder = await stage(f"s3://{bucket}/releases/{key}", s3, tmp_path)
    assert folder.name == root
    assert run_gate(inspect_adapter(folder), base_fp, LIMITS) == []
    assert not any(p.name.startswith("upload-") for p in (tmp_path / "work").iterdir())


async def test_hostile_archive_is_refused_by_the_upload_rules(s3: Any, bucket: str, tmp_path: Path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    s3.put_object(Bucket=bucket, Key="evil.tar", Body=buffer.getvalue())
    with pytest.raises(UnsafeArchive, match=r"\.\."):
        await stage(f"s3://{bucket}/evil.tar", s3, tmp_path)
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "escape").exists()


async def test_archive_over_the_limit_is_refused_before_download(
    s3: Any, bucket: str, good_adapter: Path, tmp_path: Path
):
    payload = tar_bytes(good_adapter, "a", "w")
    s3.put_object(Bucket=bucket, Key="big.tar", Body=payload)
    client = Recording(s3)
    with pytest.raises(UploadTooLarge) as error:
        await stage(f"s3://{bucket}/big.tar", client, tmp_path, max_bytes=len(payload) - 1)
    assert error.value.limit == len(payload) - 1
    assert client.calls == ["head_object"] and leftovers(tmp_path) == []
    assert (await stage(f"s3://{bucket}/big.tar", s3, tmp_path, max_bytes=len(payload))).is_dir()


async def test_object_replaced_between_head_and_get_is_refused(
    s3: Any, bucket: str, good_adapter: Path, tmp_path: Path
):
    """If-Match on HEAD's ETag: S3 itself refuses to hand out a different object."""
    s3.put_object(Bucket=bucket, Key="a.tar", Body=tar_bytes(good_adapter, "a", "w"))

    class ReplacedAfterHead:
        def head_object(self, **kwargs: Any) -> Any:
            response = s3.head_object(**kwargs)
            s3.put_object(Body=tar_bytes(good_adapter, "b", "w:gz"), **kwargs)
            return response

        def __getattr__(self, name: str) -> Any:
            return getattr(s3, name)

    with pytest.raises(IngestError, match="changed while being read"):
        await stage(f"s3://{bucket}/a.tar", ReplacedAfterHead(), tmp_path)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://{'nope-' + 'x' * 8}/missing.tar.gz",  # no such bucket
        "s3://{bucket}/missing.tar.gz",
        "s3://{bucket}/missing.zip",
        "s3://{bucket}/empty/folder/",
    ],
)
async def test_missing_objects_are_not_found(s3: Any, bucket: str, tmp_path: Path, uri: str):
    with pytest.raises(NotFound):
        await stage(uri.format(bucket=bucket), s3, tmp_path)
    assert leftovers(tmp_path) == []


BAD_URIS = [
    ("http://bucket/key", "not an s3://"),
    ("S3://bucket/key", "not an s3://"),
    ("s3:/bucket/key", "not an s3://"),
    ("s3://", "bucket name"),
    ("s3://bucket", "whole bucket"),
    ("s3://bucket/", "whole bucket"),
    ("s3://ab/key", "bucket name"),
    ("s3://" + "b" * 64 + "/key", "bucket name"),
    ("s3://Bucket/key", "bucket name"),
    ("s3://bucket_name/key", "bucket name"),
    ("s3://-bucket/key", "bucket name"),
    ("s3://my..bucket/key", "adjacent"),
    ("s3://my.-bucket/key", "adjacent"),
    ("s3://192.168.1.10/key", "IP address"),
    ("s3://xn--bucket/key", "reserved"),
    ("s3://user@bucket/key", "bucket name"),
    ("s3://bucket:9000/key", "bucket name"),
    ("s3://bucket/../secrets/", "'..'"),
    ("s3://bucket/a/../b.tar", "'..'"),
    ("s3://bucket/a/./b/", "'..'"),
    ("s3://bucket//a/", "empty"),
    ("s3://bucket/a//b/", "empty"),
    ("s3://bucket/a b/", "' '"),
    ("s3://bucket/a?versionId=1", "'?'"),
    ("s3://bucket/a#frag", "'#'"),
    ("s3://bucket/a%2e%2e/", "'%'"),
    ("s3://bucket/a\\b", "'\\\\'"),
    ("s3://bucket/a\x00b", "'\\x00'"),
    ("s3://bucket/é/", "'é'"),
    ("s3://bucket/" + "k" * 1025, "1024 bytes"),
    ("s3://bucket/" + "k/" * 2000, "characters"),
    ("s3://bucket/v1/adapter_model.safetensors", "names one file"),
    ("s3://bucket/v1/adapter_config.json", "names one file"),
    ("s3://bucket/v1/adapter_model.bin", "names one file"),
]


@pytest.mark.parametrize(("uri", "needle"), BAD_URIS, ids=[repr(u[0])[:40] for u in BAD_URIS])
async def test_bad_uris_are_refused_before_any_request(tmp_path: Path, uri: str, needle: str):
    with pytest.raises(PathNotAllowed, match=re.escape(needle)):
        await stage(uri, None, tmp_path)  # no client: any request would raise AttributeError
    assert not (tmp_path / "work").exists()


async def test_bucket_allow_list(s3: Any, bucket: str, good_adapter: Path, tmp_path: Path):
    put_folder(s3, bucket, "a/", good_adapter)
    for allowed in ([], ["other-bucket"], [bucket.upper()]):
        with pytest.raises(PathNotAllowed, match="not in the allowed adapter buckets"):
            await stage(f"s3://{bucket}/a/", s3, tmp_path, allowed_buckets=allowed)
    folder = await stage(f"s3://{bucket}/a/", s3, tmp_path, allowed_buckets=["x-y-z", bucket])
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)


# ---------------------------------------------------------------------------- fake bodies


class FakeS3Error(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


class LyingBody:
    """Sends `actual` bytes whatever HEAD said; records every read size."""

    def __init__(self, actual: int) -> None:
        self.left = actual
        self.reads: list[int] = []
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        self.reads.append(size)
        n = min(size, self.left) if size >= 0 else self.left
        self.left -= n
        return b"\0" * n

    def close(self) -> None:
        self.closed = True


class FakeClient:
    """Objects as key → (size HEAD announces, bytes the body really sends)."""

    def __init__(self, objects: dict[str, tuple[int, int]], error: str | None = None) -> None:
        self.announced = {key: announced for key, (announced, _) in objects.items()}
        self.bodies = {key: LyingBody(actual) for key, (_, actual) in objects.items()}
        self.error = error
        self.gets: dict[str, dict[str, Any]] = {}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        if self.error or Key not in self.announced:
            raise FakeS3Error(self.error or "404")
        return {"ContentLength": self.announced[Key], "ETag": f'"etag-{Key}"'}

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self.gets[kwargs["Key"]] = kwargs
        return {"Body": self.bodies[kwargs["Key"]]}


async def test_streaming_guard_stops_a_body_longer_than_announced(tmp_path: Path):
    client = FakeClient({"a.tar": (10, 5 * CHUNK)})
    with pytest.raises(UploadTooLarge) as error:
        await stage("s3://bucket/a.tar", client, tmp_path, max_bytes=2 * CHUNK + 5)
    assert error.value.limit == 2 * CHUNK + 5
    body = client.bodies["a.tar"]
    assert body.reads == [CHUNK] * 3  # bounded reads, stopped at the first chunk over the limit
    assert body.closed and client.gets["a.tar"]["IfMatch"] == '"etag-a.tar"'
    assert leftovers(tmp_path) == []


async def test_streaming_guard_on_a_folder_counts_the_whole_budget(tmp_path: Path):
    """The first file is honest and uses 100 bytes; the second lies and sends the whole limit,
    which fits max_bytes on its own but not what the first left."""
    client = FakeClient(
        {"a/adapter_config.json": (100, 100), "a/adapter_model.safetensors": (100, CHUNK)}
    )
    with pytest.raises(UploadTooLarge) as error:
        await stage("s3://bucket/a/", client, tmp_path, max_bytes=CHUNK)
    assert error.value.limit == CHUNK  # the whole limit, not what the first file left of it
    assert sorted(client.gets) == ["a/adapter_config.json", "a/adapter_model.safetensors"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("actual", [5, 15], ids=["short", "long"])
async def test_body_of_another_length_than_announced_is_refused(tmp_path: Path, actual: int):
    client = FakeClient({"a.zip": (10, actual)})
    with pytest.raises(IngestError, match=f"sent {actual} bytes where 10 were announced"):
        await stage("s3://bucket/a.zip", client, tmp_path, max_bytes=1000)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "error"),
    [("403", PathNotAllowed), ("AccessDenied", PathNotAllowed), ("NoSuchBucket", NotFound)],
)
async def test_s3_error_codes_map_to_registry_errors(
    tmp_path: Path, code: str, error: type[Exception]
):
    with pytest.raises(error):
        await stage("s3://bucket/a.tar", FakeClient({}, error=code), tmp_path)


async def test_other_s3_errors_propagate(tmp_path: Path):
    with pytest.raises(FakeS3Error):
        await stage("s3://bucket/a.tar", FakeClient({}, error="SlowDown"), tmp_path)
