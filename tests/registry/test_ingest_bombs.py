"""Archive metadata bombs: a small upload must not make the extractor hold what its headers
claim. Python's tarfile reads a pax record or a GNU long name whole into memory while looking
for the next member, and zipfile builds one object per central-directory entry, both before
any member budget runs; the extractor bounds the bytes they may read first.

The assertions count the decompressed bytes the tar reader was handed (and the zip directory's
size), so they do not depend on the test process's peak memory.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from registry import ingest
from registry.errors import UnsafeArchive
from registry.ingest import ArchiveLimits, extract_archive

MiB = 1024 * 1024
LIMITS = ArchiveLimits(max_total_bytes=MiB, max_member_bytes=MiB, max_header_bytes=64 * 1024)


def header_bomb(path: Path, kind: str, claimed: int) -> Path:
    """A .tar.gz whose first member is a pax record (or GNU long name) of `claimed` bytes,
    then a normal member; written streaming so the test never holds `claimed` bytes."""
    with gzip.open(path, "wb", compresslevel=1) as gz:
        if kind == "pax":
            # a pax record is "<length> <key>=<value>\n", its length counting its own digits
            body = len(" comment=\n") + claimed
            total = body + len(str(body + len(str(body))))
            info = tarfile.TarInfo("././@PaxHeader")
            info.type = tarfile.XHDTYPE
            info.size = total
            gz.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            gz.write(f"{total} comment=".encode())
            tail = b"\n"
        else:
            info = tarfile.TarInfo("././@LongLink")
            info.type = tarfile.GNUTYPE_LONGNAME
            info.size = claimed + 1
            gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
            tail = b"\0"
        chunk = b"A" * MiB
        for _ in range(claimed // MiB):
            gz.write(chunk)
        gz.write(tail + b"\0" * (-(claimed + len(tail)) % tarfile.BLOCKSIZE))
        member = tarfile.TarInfo("adapter_config.json")
        member.size = 2
        gz.write(member.tobuf(format=tarfile.GNU_FORMAT) + b"{}".ljust(512, b"\0") + b"\0" * 1024)
    return path


class Spy:
    """Counts what the decompressor hands tarfile (wraps ingest._open_decompressed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.handed = 0
        real = ingest._open_decompressed
        spy = self

        class Counting(io.RawIOBase):
            def __init__(self, source: Any) -> None:
                self.source = source

            def readable(self) -> bool:
                return True

            def read(self, size: int = -1) -> bytes:
                data = self.source.read(size)
                spy.handed += len(data)
                return data

            def close(self) -> None:
                self.source.close()

        monkeypatch.setattr(ingest, "_open_decompressed", lambda handle: Counting(real(handle)))


@pytest.mark.parametrize("kind", ["pax", "gnu"])
def test_a_tar_header_claiming_32_mib_is_refused_after_reading_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
):
    claimed = 32 * MiB
    archive = header_bomb(tmp_path / "bomb.tar.gz", kind, claimed)
    assert archive.stat().st_size < 256 * 1024  # it compresses ~1000:1
    spy = Spy(monkeypatch)
    with pytest.raises(UnsafeArchive, match=r"headers \(pax or GNU long name\) exceed 65536"):
        extract_archive(archive, tmp_path / "out", limits=LIMITS)
    # the header cap plus tarfile's read-ahead, nowhere near what the header claimed
    assert 0 < spy.handed <= LIMITS.max_header_bytes + 3 * tarfile.RECORDSIZE + ingest.CHUNK
    assert spy.handed < claimed / 16
    assert not (tmp_path / "out").exists()


def test_a_modest_pax_header_is_still_fine(tmp_path: Path):
    archive = tmp_path / "pax.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "c" * 20_000}  # 20 KB, within the 64 KB cap
            tar.addfile(info, io.BytesIO(data))
    root = extract_archive(archive, tmp_path / "out", limits=LIMITS)
    assert (root / "adapter_config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_every_supported_compression_still_extracts(tmp_path: Path, mode: str):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, mode) as tar:
        for name, data in (("x/adapter_config.json", b"{}"), ("x/adapter_model.safetensors", b"w")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    root = extract_archive(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "x"
    assert (root / "adapter_model.safetensors").read_bytes() == b"w"


def test_a_zip_with_a_huge_central_directory_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3000):  # 3000 entries, about 160 KB of central directory
            zf.writestr(f"{i:06d}", b"")
    parsed: list[str] = []
    real = zipfile.ZipFile._RealGetContents  # type: ignore[attr-defined]

    def spy(self: zipfile.ZipFile) -> None:
        parsed.append(str(self.filename))
        real(self)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", spy)
    limits = ArchiveLimits(max_members=5000, max_header_bytes=64 * 1024)
    with pytest.raises(UnsafeArchive, match=r"central directory is \d+ bytes; the limit is 65536"):
        extract_archive(archive, tmp_path / "out", limits=limits)
    assert parsed == []  # zipfile never built its 3000 ZipInfo objects
    with pytest.raises(UnsafeArchive, match="more than 64 members"):
        extract_archive(archive, tmp_path / "out2")  # the entry count, from the end record
    assert parsed == []


def test_a_small_zip_still_extracts(tmp_path: Path):
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", b"{}")
        zf.writestr("adapter_model.safetensors", b"x" * 1000)
    root = extract_archive(archive, tmp_path / "out", limits=LIMITS)
    assert (root / "adapter_model.safetensors").stat().st_size == 1000
