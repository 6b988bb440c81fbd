"""Text the registry refuses to store, whatever the field: NUL characters. SQLite keeps them,
PostgreSQL refuses them (in text columns and in JSONB), so on PostgreSQL a NUL in a label,
a reason or a card turned an admin call into a 500 after its checks had passed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def nul_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (a mapping's key or any value, however nested)
    holding a NUL character, "" for `value` itself; None when there is none."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                return where.replace("\x00", "\\0")
            if (found := nul_path(item, where)) is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if (found := nul_path(item, f"{path}[{index}]")) is not None:
                return found
    return None
