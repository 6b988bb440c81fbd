"""Upload ingestion: bounded streaming, hostile archives, and the local-path allow-list."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry.errors import PathNotAllowed, UnsafeArchive, UploadTooLarge
from registry.ingest import ArchiveLimits, extract_archive, receive_stream, stage_local_path


async def chunked(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_stream_is_written_and_hashed(tmp_path: Path):
    received = await receive_stream(chunked(b"x" * 5000), directory=tmp_path, max_bytes=5000)
    assert received.size == 5000 and received.path.read_bytes() == b"x" * 5000


async def test_stream_over_the_limit_raises_and_leaves_nothing(tmp_path: Path):
    with pytest.raises(UploadTooLarge) as error:
        await receive_stream(chunked(b"x" * 5001), directory=tmp_path, max_bytes=5000)
    assert error.value.limit == 5000
    assert list(tmp_path.iterdir()) == []


def make_tar(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w"
) -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def regular(name: str, data: bytes = b"{}") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_tar_with_a_wrapping_folder(tmp_path: Path):
    archive = make_tar(
        tmp_path / "a.tar.gz",
        [
            regular("adapter/adapter_config.json"),
            regular("adapter/adapter_model.safetensors", b"x"),
        ],
        mode="w:gz",
    )
    root = extract_archive(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "adapter"
    assert sorted(p.name for p in root.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


HOSTILE_TAR = [
    ("absolute", [regular("/etc/cron.d/x")], "absolute"),
    ("dotdot", [regular("adapter/../../x")], ".."),
    ("backslash", [regular("..\\..\\x")], "non-POSIX"),
    ("symlink", [special("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd")], "link"),
    ("hardlink", [special("x", tarfile.LNKTYPE, "/etc/passwd")], "link"),
    ("fifo", [special("x", tarfile.FIFOTYPE)], "special"),
    ("char device", [special("x", tarfile.CHRTYPE)], "special"),
    ("too many", [regular(f"f{i}") for i in range(5)], "more than 4"),
    ("too deep", [regular("a/b/c/d/e/f")], "deeper"),
    ("too big", [regular("big", b"x" * 2000)], "larger"),
]


@pytest.mark.parametrize(
    ("case", "members", "needle"), HOSTILE_TAR, ids=[h[0] for h in HOSTILE_TAR]
)
def test_hostile_tars(tmp_path: Path, case: str, members, needle: str):
    archive = make_tar(tmp_path / "evil.tar", members)
    limits = ArchiveLimits(max_members=4, max_member_bytes=1000, max_total_bytes=1500)
    with pytest.raises(UnsafeArchive, match=needle):
        extract_archive(archive, tmp_path / "out", limits=limits)
    assert not (tmp_path / "out").exists()  # nothing left behind
    assert not (tmp_path / "etc").exists() and not Path("/etc/cron.d/x").exists()


def test_total_size_is_counted_across_members(tmp_path: Path):
    archive = make_tar(tmp_path / "t.tar", [regular(f"f{i}", b"x" * 900) for i in range(3)])
    limits = ArchiveLimits(max_member_bytes=1000, max_total_bytes=2000)
    with pytest.raises(UnsafeArchive, match="expands past 2000"):
        extract_archive(archive, tmp_path / "out", limits=limits)


def test_zip_bomb_is_stopped_by_real_bytes(tmp_path: Path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * 5_000_000)  # compresses to ~5 KB
    assert archive.stat().st_size < 50_000
    with pytest.raises(UnsafeArchive):
        extract_archive(archive, tmp_path / "out", limits=ArchiveLimits(max_total_bytes=1_000_000))


async def test_an_upload_unpacks_to_no_more_than_the_upload_limit(tmp_path: Path):
    """The default 2 GiB archive limits used to apply whatever LORAPLEX_UPLOAD_MAX_BYTES said:
    a 5 KB zip under a 1 MB limit wrote 5 MB (and one of 300 KB, 300 MB)."""
    from registry.ingest import ingest_upload

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * 5_000_000)
    blob = archive.read_bytes()
    with pytest.raises(UnsafeArchive, match="1000000"):
        await ingest_upload(chunked(blob), workdir=tmp_path / "small", max_bytes=1_000_000)
    (tmp_path / "large").mkdir()
    folder = await ingest_upload(chunked(blob), workdir=tmp_path / "large", max_bytes=6_000_000)
    assert (folder / "adapter_model.safetensors").stat().st_size == 5_000_000


def test_zip_with_traversal_and_symlink(tmp_path: Path):
    traversal = tmp_path / "t.zip"
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("../../evil", b"x")
    with pytest.raises(UnsafeArchive, match=r"\.\."):
        extract_archive(traversal, tmp_path / "o1")
    link = tmp_path / "l.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("adapter_model.safetensors")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="link"):
        extract_archive(link, tmp_path / "o2")


def test_good_zip(tmp_path: Path):
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("adapter_config.json", b"{}")
        zf.writestr("adapter_model.safetensors", b"x")
    assert extract_archive(archive, tmp_path / "out") == tmp_path / "out"


def test_not_an_archive(tmp_path: Path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(UnsafeArchive, match="neither"):
        extract_archive(junk, tmp_path / "out")


def test_local_paths_must_resolve_under_an_allowed_root(tmp_path: Path):
    root = tmp_path / "adapters"
    (root / "good").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (root / "escape").symlink_to(secret)  # a link inside the root pointing out of it
    (root / "inner").symlink_to(root / "good")  # a link that stays inside is fine
    assert stage_local_path(root / "good", allowed_roots=[root]) == (root / "good").resolve()
    assert stage_local_path(root / "inner", allowed_roots=[root]) == (root / "good").resolve()
    for bad in (root / "escape", root / "good" / ".." / ".." / "secret", secret, Path("relative")):
        with pytest.raises(PathNotAllowed):
            stage_local_path(bad, allowed_roots=[root])
    with pytest.raises(PathNotAllowed, match="does not exist"):
        stage_local_path(root / "missing", allowed_roots=[root])


def test_a_failing_member_is_refused_without_naming_server_paths(tmp_path: Path):
    archive = make_tar(tmp_path / "twice.tar", [regular("a", b"1"), regular("a", b"2")])
    with pytest.raises(UnsafeArchive) as refused:
        extract_archive(archive, tmp_path / "out")
    assert str(tmp_path) not in str(refused.value) and "File exists" in str(refused.value)
