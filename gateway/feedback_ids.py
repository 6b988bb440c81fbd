"""Response ids that carry their own receipt: which adapter version served the response, in
which rollout role, for which tenant, and when. `POST /v1/feedback` names a response by its id
alone, so the feedback lands on the version that really answered (a canary or its stable,
whichever the caller's sticky assignment picked) without a write per request, and on any
replica that shares the secret (`LORAPLEX_FEEDBACK_SECRET`).

    <prefix>-<32 hex random>-<base64url(encrypted payload, MAC)>

The payload (version row id, judged flag, issued at, role tag) is encrypted with a keystream
derived from the secret and the id's random part (HMAC-SHA256 as the PRF): version row ids are
one sequence across all tenants, and in clear they would show any tenant how fast the registry
grows. The MAC (HMAC-SHA256, truncated to 104 bits) covers the random part, the ciphertext and
the caller's tenant id: an id sent by another tenant, edited, or issued under another secret
reads as unknown, so feedback is one vote per response a tenant was really served. Payload and
MAC are 30 bytes, a multiple of 3, so the base64url text has no spare bits: each id has exactly
one spelling (the duplicate check keys on it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass

# version row id (0: the base model), judged flag, issued at (unix seconds), role tag
_PAYLOAD = struct.Struct(">QBII")
_MAC_BYTES = 13
_TOKEN_BYTES = _PAYLOAD.size + _MAC_BYTES
assert _TOKEN_BYTES % 3 == 0, "base64 of the token must have no spare bits"
_TOKEN_CHARS = _TOKEN_BYTES // 3 * 4
# Exactly the alphabet: the decoder skips other characters, and an id spelt two ways would be
# two responses to the duplicate check.
_BASE64URL = re.compile(f"[A-Za-z0-9_-]{{{_TOKEN_CHARS}}}")
PREFIXES = ("chatcmpl", "cmpl")
MIN_SECRET_BYTES = 16
ANSWER_MAC_BYTES = 18  # 144 bits; a multiple of 3, so its base64url has one spelling
# Sent by a client (`loraplex eval run`) that wants its non-streamed answer's receipt, which
# comes back in the response header of the same name.
ANSWER_RECEIPT_HEADER = "x-loraplex-answer-receipt"


@dataclass(frozen=True)
class Receipt:
    """What a response id proves about the response it names."""

    version_id: int | None  # the adapter version's registry row id; None: the base model
    judged: bool  # the caller's traffic judges the version's rollout (ServedModel.judged_by)
    issued_at: int  # unix seconds
    role_tag: int = 0  # RolloutController.role_tag when it was served (0: no judged role)


class ResponseIds:
    def __init__(self, secret: bytes | None = None):
        """`secret` None: a random one, so ids verify on this process only (no replica shares
        it, and a restart forgets it)."""
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the feedback secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.shared = secret is not None

    def sign(
        self,
        head: str,
        *,
        version_id: int | None,
        judged: bool,
        tenant_id: int,
        now: float,
        role_tag: int = 0,
    ) -> str:
        """`head` (a fresh `<prefix>-<32 hex>` id) with its receipt appended."""
        payload = _PAYLOAD.pack(version_id or 0, int(judged), int(now), role_tag)
        ciphertext = _xor(payload, self._keystream(head))
        token = ciphertext + self._mac(head, ciphertext, tenant_id)
        return f"{head}-{base64.urlsafe_b64encode(token).decode()}"

    def read(self, response_id: str, *, tenant_id: int) -> Receipt | None:
        """The receipt of an id this gateway issued to `tenant_id`; None for anything else."""
        # By length, not by the last "-": base64url uses "-" too.
        head = response_id[: -_TOKEN_CHARS - 1]
        separator = response_id[-_TOKEN_CHARS - 1 : -_TOKEN_CHARS]
        encoded = response_id[-_TOKEN_CHARS:]
        prefix, _, random_part = head.partition("-")
        if (
            separator != "-"
            or prefix not in PREFIXES
            or len(random_part) != 32
            or not _BASE64URL.fullmatch(encoded)
        ):
            return None
        try:
            token = base64.urlsafe_b64decode(encoded)
        except (binascii.Error, ValueError):
            return None
        ciphertext, mac = token[: _PAYLOAD.size], token[_PAYLOAD.size :]
        if not hmac.compare_digest(mac, self._mac(head, ciphertext, tenant_id)):
            return None
        version_id, judged, issued_at, role_tag = _PAYLOAD.unpack(
            _xor(ciphertext, self._keystream(head))
        )
        return Receipt(version_id or None, bool(judged), issued_at, role_tag)

    def answer_receipt(self, response_id: str, request_body: bytes, text: str) -> str:
        """A receipt binding an answer's text to the exact request bytes it answered and to its
        response id (which binds version and tenant): what an eval report's answers carry, so
        the gateway can tell its own answers from edited ones (gateway/services/eval_evidence)."""
        return base64.urlsafe_b64encode(self._answer_mac(response_id, request_body, text)).decode()

    def answer_matches(
        self, receipt: str, response_id: str, request_body: bytes, text: str
    ) -> bool:
        expected = self.answer_receipt(response_id, request_body, text)
        return hmac.compare_digest(receipt.encode(), expected.encode())

    def _answer_mac(self, response_id: str, request_body: bytes, text: str) -> bytes:
        message = b"answer\x00%s\x00%s\x00%s" % (
            response_id.encode(),
            hashlib.sha256(request_body).digest(),
            hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(),
        )
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:ANSWER_MAC_BYTES]

    def _keystream(self, head: str) -> bytes:
        # Unique per id: the head's random part is 128 bits.
        return hmac.new(self._secret, b"enc\x00" + head.encode(), hashlib.sha256).digest()

    def _mac(self, head: str, ciphertext: bytes, tenant_id: int) -> bytes:
        message = b"mac\x00%s\x00%s\x00%d" % (head.encode(), ciphertext, tenant_id)
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _xor(data: bytes, keystream: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, keystream, strict=False))
