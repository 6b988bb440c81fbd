"""Malformed uploads are refusals that name the reason, never exceptions (HTTP 500s).

Each case used to escape the gate as IsADirectoryError, TypeError, RecursionError or
ValueError; here each goes through the real archive extraction and the real service
registration, and must come back as AdapterRejected with the exact problem.
"""

from __future__ import annotations

import errno
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from registry import service
from registry.compat import (
    BaseModelFingerprint,
    EngineLimits,
    ProblemCode,
    inspect_adapter,
    run_gate,
)
from registry.errors import AdapterRejected
from registry.ingest import extract_archive
from registry.store.local import LocalArtifactStore
from tests.registry.helpers import WEIGHTS, read_raw, write_raw

C = ProblemCode
CONFIG = "adapter_config.json"
DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def long_layer_weights(good: Path) -> bytes:
    header, data = read_raw(good / WEIGHTS)
    old = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header[old.replace("layers.0.", "layers." + "9" * 5000 + ".")] = header.pop(old)
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


def cases(good: Path) -> dict[str, tuple[dict[str, bytes], ProblemCode, str]]:
    config = (good / CONFIG).read_bytes()
    weights = (good / WEIGHTS).read_bytes()
    both = {CONFIG: config, WEIGHTS: weights}
    return {
        "weights are a folder": (
            {CONFIG: config, f"{WEIGHTS}/x": b""},
            C.MISSING_FILE,
            f"{WEIGHTS} is a folder, not a file",
        ),
        "config is a folder": (
            {f"{CONFIG}/x": b"", WEIGHTS: weights},
            C.MISSING_FILE,
            f"{CONFIG} is a folder, not a file",
        ),
        "additional_special_tokens is a number": (
            {**both, "tokenizer_config.json": b'{"additional_special_tokens": 5}'},
            C.TOKENIZER_MISMATCH,
            "tokenizer_config.json: additional_special_tokens must be a list of tokens",
        ),
        "eos_token is a number": (
            {**both, "special_tokens_map.json": b'{"eos_token": 5}'},
            C.TOKENIZER_MISMATCH,
            "special_tokens_map.json: eos_token must be a token string",
        ),
        "tokenizer_config nested 100k deep": (
            {**both, "tokenizer_config.json": DEEP},
            C.TOKENIZER_MISMATCH,
            "cannot read tokenizer_config.json: JSON nested too deeply",
        ),
        "added_tokens nested 100k deep": (
            {**both, "vocab.json": b'{"<s>": 0}', "added_tokens.json": DEEP},
            C.TOKENIZER_MISMATCH,
            "cannot read added_tokens.json: JSON nested too deeply",
        ),
        "tokenizer.json is a folder": (
            {**both, "tokenizer.json/x": b""},
            C.TOKENIZER_MISMATCH,
            "tokenizer.json: a folder, not a file",
        ),
        "config nested 100k deep": (
            {CONFIG: DEEP, WEIGHTS: weights},
            C.CONFIG_INVALID,
            f"{CONFIG} is not valid JSON: is nested too deeply",
        ),
        "5000-digit layer index": (
            {CONFIG: config, WEIGHTS: long_layer_weights(good)},
            C.UNKNOWN_TENSOR,
            "unexpected tensors: base_model.model.model.layers.999",
        ),
    }


CASE_NAMES = [
    "weights are a folder",
    "config is a folder",
    "additional_special_tokens is a number",
    "eos_token is a number",
    "tokenizer_config nested 100k deep",
    "added_tokens nested 100k deep",
    "tokenizer.json is a folder",
    "config nested 100k deep",
    "5000-digit layer index",
]


@pytest.fixture
async def registry_world(session: AsyncSession, base_fp: BaseModelFingerprint) -> AsyncSession:
    await service.register_base_model(session, name="tiny-llama", fingerprint=base_fp, actor="t")
    await service.create_tenant(session, name="acme", actor="root")
    return session


@pytest.mark.parametrize("case", CASE_NAMES)
async def test_malformed_uploads_are_refused_with_the_reason(
    registry_world: AsyncSession,
    store: LocalArtifactStore,
    base_fp: BaseModelFingerprint,
    good_adapter: Path,
    tmp_path: Path,
    case: str,
):
    files, code, reason = cases(good_adapter)[case]
    archive = tmp_path / "upload.tar"
    archive.write_bytes(tar_of(files))
    folder = extract_archive(archive, tmp_path / "out")
    with pytest.raises(AdapterRejected) as rejected:
        await service.register_adapter_version(
            registry_world,
            store=store,
            artifact_dir=folder,
            name="malformed",
            tenant="acme",
            served_base=base_fp,
            max_lora_rank=16,
            actor="admin",
        )
    problems = rejected.value.problems
    assert code in {p.code for p in problems}, problems
    assert any(reason in p.message for p in problems if p.code == code), problems
    assert all(str(tmp_path) not in p.message for p in problems)


def test_a_read_error_is_a_named_problem_without_the_server_path(
    good_adapter: Path, copy_adapter: Any, base_fp: BaseModelFingerprint, monkeypatch
):
    folder = copy_adapter(good_adapter)
    real_open = Path.open

    def failing_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name in (WEIGHTS, CONFIG):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    problems = run_gate(inspect_adapter(folder), base_fp, EngineLimits(max_lora_rank=16))
    messages = {p.code: p.message for p in problems}
    assert messages[C.CONFIG_INVALID] == f"{CONFIG} cannot be read (Input/output error)"
    assert messages[C.HEADER_INVALID] == f"{WEIGHTS}: the file cannot be read (Input/output error)"
    assert all(str(folder) not in m for m in messages.values())


def test_write_raw_round_trip_still_passes(good_adapter: Path, copy_adapter: Any, base_fp):
    """Control for the byte surgery above: rewriting the header unchanged keeps it valid."""
    folder = copy_adapter(good_adapter)
    header, data = read_raw(folder / WEIGHTS)
    write_raw(folder / WEIGHTS, header, data)
    assert run_gate(inspect_adapter(folder), base_fp, EngineLimits(max_lora_rank=16)) == []
