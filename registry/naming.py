"""Names and how versions are addressed.

Adapter and tenant names are slugs: `^[a-z0-9][a-z0-9._-]{0,62}$`, never containing `..`. They
cannot carry a path separator, a drive letter, whitespace or an `@`, so a name is always safe as
a file name, a URL segment and a metric label; `base` is reserved. Adapter names are unique
across the registry (the OpenAI `model` field must resolve to one adapter whichever tenant asks).

Base model names follow checkpoint folder names (`Llama-3-8B`), so they may also use upper case
and run to 128 characters; the same no-separator / no-`..` rules apply.

Versions are positive integers assigned by the registry per adapter (1, 2, 3, …), never reused,
even after a delete (deleted versions stay as tombstones). A client addresses:

- `name`      the adapter's current servable version (see `registry.service.resolve_adapter`);
- `name@3`    exactly version 3.

The seed's record ID `{Base-Model-Name}-{Task-Namespace}-v{Version}` is derived, not stored:
`seed_id("llama3-8b", "extractor", 2) == "llama3-8b-extractor-v2"`, where the adapter name plays
the task namespace. `parse_seed_id` anchors on the trailing `-v<version>` and on the known base
name, because base names contain hyphens too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidName

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
BASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_ADAPTER_NAMES = frozenset({"base"})
_SEED_VERSION_RE = re.compile(r"-v([1-9][0-9]{0,8})$")
_ADDRESS_RE = re.compile(r"^(?P<name>[^@]+)(?:@(?P<version>[1-9][0-9]{0,8}))?$")


def name_problem(name: object, *, what: str = "adapter") -> str | None:
    """Why `name` is not a valid adapter/tenant name, or None when it is."""
    if what == "adapter" and isinstance(name, str) and name in RESERVED_ADAPTER_NAMES:
        return f"{name!r} is reserved (a card's rollback_path 'base' means the base model)"
    return _problem(name, NAME_RE, what, "lower-case letters, digits, '.', '_' or '-', ≤ 63 chars")


def base_name_problem(name: object) -> str | None:
    return _problem(name, BASE_NAME_RE, "base model", "letters, digits, '.', '_' or '-', ≤ 128")


def _problem(name: object, pattern: re.Pattern[str], what: str, rule: str) -> str | None:
    if not isinstance(name, str):
        return f"{what} name must be a string"
    if not pattern.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "…"
        return f"{what} name {shown!r} is invalid: use {rule}, starting with a letter or digit"
    if ".." in name:
        return f"{what} name {name!r} must not contain '..'"
    return None


def validate_name(name: str, *, what: str = "adapter") -> str:
    problem = name_problem(name, what=what)
    if problem:
        raise InvalidName(problem)
    return name


def validate_base_name(name: str) -> str:
    problem = base_name_problem(name)
    if problem:
        raise InvalidName(problem)
    return name


@dataclass(frozen=True)
class AdapterAddress:
    """What a client asked for: an adapter name and optionally one exact version."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_address(text: str) -> AdapterAddress:
    """Parse `name` or `name@<version>`; raises InvalidName."""
    match = _ADDRESS_RE.fullmatch(text)
    if match is None:
        raise InvalidName(f"{text[:80]!r} is not an adapter address (name or name@version)")
    name = validate_name(match["name"])
    version = match["version"]
    return AdapterAddress(name, int(version) if version else None)


def seed_id(base_name: str, adapter_name: str, version: int) -> str:
    """The seed's `{base}-{namespace}-v{version}` record ID for one adapter version."""
    return f"{base_name}-{adapter_name}-v{version}"


def parse_seed_id(text: str, *, base_name: str) -> AdapterAddress:
    """Split a seed record ID back into (adapter name, version), given the served base's name."""
    match = _SEED_VERSION_RE.search(text)
    prefix = f"{base_name}-"
    if match is None or not text.startswith(prefix):
        raise InvalidName(f"{text[:80]!r} is not a '{base_name}-<name>-v<version>' record ID")
    name = text[len(prefix) : match.start()]
    return AdapterAddress(validate_name(name), int(match[1]))
