"""`s3://bucket/key` URIs, strictly: S3's bucket naming rules and a conservative key syntax."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_KEY_BYTES = 1024  # S3's own limit on a key
MAX_URI_CHARS = len("s3://") + 63 + 1 + MAX_KEY_BYTES
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", "--x-s3", ".mrap")
# AWS's "safe" key characters plus a few that need no escaping anywhere we pass a key; spaces,
# `?`, `#`, `%`, backslashes and control characters are refused rather than guessed about.
_KEY = re.compile(r"^[A-Za-z0-9/!_.*'()=+@,:~-]*$")


class S3UriError(ValueError):
    """An `s3://` URI that is malformed; the message says which rule it broke."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # may be "" (the whole bucket) or end with "/" (a prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str, *, require_key: bool = True) -> S3Uri:
    """Split `s3://bucket/key` after checking bucket naming rules and refusing empty, `.` and
    `..` segments and any character outside a conservative set. No percent-decoding: the key is
    taken literally, as the AWS CLI does."""
    if not isinstance(uri, str) or len(uri) > MAX_URI_CHARS:
        raise S3UriError(f"an S3 URI is a string of at most {MAX_URI_CHARS} characters")
    if not uri.startswith("s3://"):
        raise S3UriError(f"{uri[:80]!r} is not an s3://bucket/key URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    check_bucket_name(bucket)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise S3UriError(f"the key is longer than S3's {MAX_KEY_BYTES} bytes")
    if not _KEY.fullmatch(key):
        bad = next(c for c in key if not _KEY.fullmatch(c))
        raise S3UriError(f"character {bad!r} is not allowed in an S3 key here")
    segments = key.split("/")
    if key.endswith("/"):
        segments.pop()  # a trailing slash only marks a prefix
    if key and any(s in ("", ".", "..") for s in segments):
        raise S3UriError(f"{uri[:200]!r} has an empty, '.' or '..' path segment")
    if require_key and not key:
        raise S3UriError(f"{uri[:200]!r} names a whole bucket; name a folder or an object in it")
    return S3Uri(bucket, key)


def check_bucket_name(bucket: str) -> str:
    """S3's general-purpose bucket naming rules (3-63 lower-case letters, digits, `.` and `-`)."""
    if not _BUCKET.fullmatch(bucket):
        raise S3UriError(
            f"bucket name {bucket[:80]!r} must be 3-63 lower-case letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        raise S3UriError(f"bucket name {bucket!r} has adjacent '.'/'-' characters")
    if bucket.startswith(_BUCKET_RESERVED_PREFIXES) or bucket.endswith(_BUCKET_RESERVED_SUFFIXES):
        raise S3UriError(f"bucket name {bucket!r} uses a prefix or suffix reserved by S3")
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return bucket
    raise S3UriError(f"bucket name {bucket!r} is formatted as an IP address")
