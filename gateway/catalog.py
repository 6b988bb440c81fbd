"""Where servable models come from: the base plus adapters, resolved by the name clients send.

The gateway asks a ModelCatalog, never the file system, which adapter a `model` names. Until the
registry issue lands the catalog is a directory (each subfolder a PEFT adapter, name = folder
name); the registry-backed catalog replaces it behind the same two methods.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.engine.client import AdapterHandle
from gateway.errors import ModelNotFound

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: the base (adapter None) or an adapter on it."""

    name: str
    adapter: AdapterHandle | None
    created: int
    parent: str | None = None
    owned_by: str = "loraplex"


class ModelCatalog(Protocol):
    async def list_models(self) -> list[ServedModel]: ...

    async def resolve(self, name: str) -> ServedModel:
        """Raises ModelNotFound for anything that is not servable."""
        ...


class DirectoryCatalog:
    """The base model plus every valid PEFT adapter folder found once at start-up."""

    def __init__(self, base_name: str, adapter_dir: Path | None, max_lora_rank: int):
        self._base = ServedModel(name=base_name, adapter=None, created=int(time.time()))
        self._adapters: dict[str, ServedModel] = {}
        if adapter_dir is not None:
            self._adapters = _scan(adapter_dir, base_name, max_lora_rank)

    async def list_models(self) -> list[ServedModel]:
        return [self._base, *self._adapters.values()]

    async def resolve(self, name: str) -> ServedModel:
        if name == self._base.name:
            return self._base
        found = self._adapters.get(name)
        if found is None:
            raise ModelNotFound(name)
        return found


def _scan(adapter_dir: Path, base_name: str, max_lora_rank: int) -> dict[str, ServedModel]:
    if not adapter_dir.is_dir():
        logger.warning("adapter directory %s does not exist; serving the base only", adapter_dir)
        return {}
    found: dict[str, ServedModel] = {}
    # Sorted so engine ids are stable across restarts over the same folder.
    for engine_id, folder in enumerate(sorted(p for p in adapter_dir.iterdir() if p.is_dir()), 1):
        problem = _unservable_reason(folder, max_lora_rank)
        if problem:
            logger.warning("skipping adapter %s: %s", folder.name, problem)
            continue
        handle = AdapterHandle(engine_id=engine_id, path=str(folder.resolve()))
        created = int(folder.stat().st_mtime)
        found[folder.name] = ServedModel(folder.name, handle, created, parent=base_name)
    return found


def _unservable_reason(folder: Path, max_lora_rank: int) -> str | None:
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable adapter_config.json ({exc})"
    if config.get("peft_type") != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA"
    rank = config.get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_lora_rank:
        return f"rank {rank!r} outside 1..max_lora_rank ({max_lora_rank})"
    return None
