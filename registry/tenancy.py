"""Tenant policy and API key format: pure functions, no I/O.

A tenant's policy is stored in `tenants.limits` as `TenantPolicy.to_stored()`; None (or a
missing field) means unlimited. The gateway enforces it; the registry only validates and keeps it.

API keys look like `lpx_<key_id>_<secret>`: `key_id` is 12 lower-case base32 characters (the
public part, stored in clear, used for the lookup and in logs) and `secret` is
`secrets.token_urlsafe(32)` (256 random bits, 43 characters). Only sha256(secret) is stored.

Why sha256 and not bcrypt/argon2: slow password hashes exist to make guessing *low-entropy*
secrets expensive after a database leak. A 256-bit random secret cannot be guessed at any hash
speed, so a slow hash would add no security, only tens of milliseconds of CPU on every request
(and a cheap way to overload the gateway with bad keys).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from registry.errors import InvalidPolicy

KEY_PREFIX = "lpx_"
KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
KEY_ID_CHARS = 12  # 60 bits: collisions are a non-issue, and the unique constraint catches one
SECRET_BYTES = 32
SECRET_CHARS = 43  # len(secrets.token_urlsafe(32))
API_KEY_CHARS = len(KEY_PREFIX) + KEY_ID_CHARS + 1 + SECRET_CHARS
_API_KEY_RE = re.compile(
    rf"lpx_(?P<key_id>[a-z2-7]{{{KEY_ID_CHARS}}})_(?P<secret>[A-Za-z0-9_-]{{{SECRET_CHARS}}})"
)


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant may do. None means unlimited."""

    requests_per_second: float | None = None
    # Token-bucket size for requests_per_second; None → max(1, ceil(requests_per_second)).
    burst: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    # Upper bound on a request's max_tokens (and the default when the client sends none).
    max_tokens: int | None = None
    allow_base_model: bool = True

    @property
    def bucket_size(self) -> int | None:
        """The effective burst: None when requests per second are unlimited."""
        if self.requests_per_second is None:
            return None
        return self.burst or max(1, math.ceil(self.requests_per_second))

    @classmethod
    def from_stored(cls, data: Mapping[str, Any] | None) -> TenantPolicy:
        """Read a stored policy. Unknown fields are ignored, so a replica running older code
        keeps working while a newer one writes a field it does not know yet; the known ones are
        validated (they were on write, so a failure here means the row was edited by hand)."""
        if data is None:
            return cls()
        known = {f.name for f in fields(cls)}
        return validate_policy(_within_bounds({k: v for k, v in data.items() if k in known}))

    def to_stored(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_POSITIVE_INTS = ("burst", "tokens_per_minute", "max_concurrent", "max_tokens")
# Bounds that keep a limit a number the limiter can compute with (a float holds integers
# exactly up to 2**53; 10**400 tokens a minute was stored, then every request was a 500) and a
# wait it can express (one request a day at the slowest: 5e-324 made Retry-After infinite).
MAX_LIMIT = 2**53
MIN_REQUESTS_PER_SECOND = 1 / 86400


def policy_problems(data: object) -> list[str]:
    """Every reason `data` is not a valid policy (empty when it is)."""
    if not isinstance(data, Mapping):
        return [f"a policy must be an object, got {type(data).__name__}"]
    problems = []
    known = [f.name for f in fields(TenantPolicy)]
    for key in data:
        if key not in known:
            shown = repr(key)[:80]
            problems.append(f"unknown field {shown}; allowed: {', '.join(known)}")
    rps = data.get("requests_per_second")
    if rps is not None and not (
        _positive_number(rps) and MIN_REQUESTS_PER_SECOND <= rps <= MAX_LIMIT  # type: ignore[operator]
    ):
        problems.append(
            f"requests_per_second must be a positive finite number from 1/86400 (one a day) "
            f"to 2**53, got {_show(rps)}"
        )
    for key in _POSITIVE_INTS:
        value = data.get(key)
        if value is not None and not (_integer(value) and 0 < value <= MAX_LIMIT):  # type: ignore[operator]
            problems.append(f"{key} must be a positive integer up to 2**53, got {_show(value)}")
    if data.get("burst") is not None and rps is None:
        problems.append("burst needs requests_per_second (it is the size of that rate's bucket)")
    allow = data.get("allow_base_model", True)
    if not isinstance(allow, bool):
        problems.append(f"allow_base_model must be true or false, got {_show(allow)}")
    return problems


def _within_bounds(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored policy brought within today's bounds, as it behaved before they existed:
    a limit above MAX_LIMIT was unlimited in effect, a rate below one a day is one a day.
    Bounds apply on write; on read they must not turn a tenant's every request into an error."""
    bounded = dict(stored)
    for key in (*_POSITIVE_INTS, "requests_per_second"):
        value = bounded.get(key)
        if _positive_number(value) and value > MAX_LIMIT:  # type: ignore[operator]
            bounded[key] = None
    rps = bounded.get("requests_per_second")
    if _positive_number(rps) and rps < MIN_REQUESTS_PER_SECOND:  # type: ignore[operator]
        bounded["requests_per_second"] = MIN_REQUESTS_PER_SECOND
    if bounded.get("burst") is not None and bounded.get("requests_per_second") is None:
        bounded["burst"] = None  # its rate became unlimited
    return bounded


def validate_policy(data: Mapping[str, Any]) -> TenantPolicy:
    """The policy `data` describes; raises InvalidPolicy listing every problem."""
    problems = policy_problems(data)
    if problems:
        raise InvalidPolicy(problems)
    values = {k: v for k, v in data.items() if v is not None}
    if "requests_per_second" in values:
        values["requests_per_second"] = float(values["requests_per_second"])
    return TenantPolicy(**values)


def _integer(value: object) -> bool:
    # bool is an int subclass; `true` is not a limit.
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value: object) -> bool:
    if _integer(value):
        return value > 0  # type: ignore[operator]
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _show(value: object) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:40] + "…"
    return f"{shown} ({type(value).__name__})"


# ---------------------------------------------------------------------------- API keys


def hash_secret(secret: str) -> str:
    """sha256 hex of the key's secret part (see the module docstring for why not bcrypt)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def generate_api_key() -> tuple[str, str, str]:
    """A new key: (plaintext to show once, key_id to store, secret_sha256 to store)."""
    key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_CHARS))
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return f"{KEY_PREFIX}{key_id}_{secret}", key_id, hash_secret(secret)


def parse_api_key(presented: object) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None. The length is checked before the
    regex, so arbitrarily long input costs nothing."""
    if not isinstance(presented, str) or len(presented) != API_KEY_CHARS:
        return None
    match = _API_KEY_RE.fullmatch(presented)
    if match is None:
        return None
    return match["key_id"], match["secret"]


# Keys an operator chooses (demo mode's LORAPLEX_DEMO_API_KEY) need not have the lpx_ shape.
# Their key id is derived from a hash of the whole key, so lookup and storage work exactly as
# for generated keys: the id in clear, only sha256 of the secret (here: the whole key) stored.
CHOSEN_KEY_MIN_CHARS = 16
CHOSEN_KEY_MAX_CHARS = 200
_CHOSEN_KEY_RE = re.compile(r"[A-Za-z0-9._~+/=-]+")


def chosen_key_parts(plaintext: object) -> tuple[str, str] | None:
    """(key_id, secret) for an operator-chosen key, or None if it is not acceptable."""
    if not isinstance(plaintext, str):
        return None
    if not CHOSEN_KEY_MIN_CHARS <= len(plaintext) <= CHOSEN_KEY_MAX_CHARS:
        return None
    if _CHOSEN_KEY_RE.fullmatch(plaintext) is None:
        return None
    digest = hashlib.sha256(b"loraplex-chosen-key:" + plaintext.encode("ascii")).digest()
    encoded = base64.b32encode(digest).decode("ascii").lower()
    # "x" first: never equal to a generated id's first letter? It can be; the unique
    # constraint on key_id settles the 2^-55 chance of a clash.
    return "x" + encoded[: KEY_ID_CHARS - 1], plaintext


def parse_presented_key(presented: object) -> tuple[str, str] | None:
    """What authentication looks up: a generated key, else an operator-chosen one."""
    return parse_api_key(presented) or chosen_key_parts(presented)


def key_id_for(value: str) -> str | None:
    """A key id as given, or the id of a whole key (generated or chosen: an operator pasting
    a leaked key); None when `value` is neither, so callers never echo or log what may be a
    secret. Ids are KEY_ID_CHARS long and chosen keys at least CHOSEN_KEY_MIN_CHARS."""
    if len(value) == KEY_ID_CHARS and value.isascii() and value.isalnum():
        return value
    parsed = parse_presented_key(value)
    return parsed[0] if parsed is not None else None
