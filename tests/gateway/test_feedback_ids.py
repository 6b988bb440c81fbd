"""Response ids carry a receipt only the issuing secret can make, bound to one tenant."""

from __future__ import annotations

import base64
import string
import struct

import pytest

from gateway.feedback_ids import Receipt, ResponseIds

HEAD = "chatcmpl-" + "ab" * 16
SECRET = b"s" * 32


def signed(ids: ResponseIds, **overrides) -> str:
    fields = {"version_id": 42, "judged": True, "tenant_id": 7, "now": 1_800_000_000.5}
    return ids.sign(HEAD, **{**fields, **overrides})


def test_a_signed_id_reads_back_for_its_tenant_only():
    ids = ResponseIds(SECRET)
    response_id = signed(ids)
    assert response_id.startswith(HEAD + "-")
    assert ids.read(response_id, tenant_id=7) == Receipt(42, True, 1_800_000_000)
    assert ids.read(response_id, tenant_id=8) is None


def test_the_base_model_and_unjudged_requests_read_back_as_such():
    ids = ResponseIds(SECRET)
    assert ids.read(signed(ids, version_id=None, judged=False), tenant_id=7) == Receipt(
        None, False, 1_800_000_000
    )


def test_another_replica_with_the_same_secret_reads_it_and_one_with_another_does_not():
    response_id = signed(ResponseIds(SECRET))
    assert ResponseIds(SECRET).read(response_id, tenant_id=7) is not None
    assert ResponseIds(b"t" * 32).read(response_id, tenant_id=7) is None
    assert ResponseIds().read(response_id, tenant_id=7) is None  # a random per-process secret


ALPHABET = string.ascii_letters + string.digits + "-_"


def test_every_edited_character_makes_the_id_unknown():
    """Every other character at every position, the base64 alphabet's whole: an id has one
    spelling (a token with spare bits verified under 16; found by review)."""
    ids = ResponseIds(SECRET)
    response_id = signed(ids)
    for i, char in enumerate(response_id):
        for replacement in set(ALPHABET) - {char}:
            edited = response_id[:i] + replacement + response_id[i + 1 :]
            assert ids.read(edited, tenant_id=7) is None, (i, replacement)


def test_the_role_tag_reads_back_and_the_payload_is_not_in_clear():
    ids = ResponseIds(SECRET)
    response_id = signed(ids, role_tag=0xDEADBEEF)
    assert ids.read(response_id, tenant_id=7) == Receipt(42, True, 1_800_000_000, 0xDEADBEEF)
    token = base64.urlsafe_b64decode(response_id[-40:])
    for clear in (struct.pack(">Q", 42), struct.pack(">I", 1_800_000_000)):
        assert clear not in token  # version row ids are one sequence across tenants


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "-",
        "x",
        "chatcmpl-",
        HEAD,
        HEAD + "-",
        HEAD + "-" + "é" * 32,
        HEAD + "-" + "=" * 32,
        "cmpl-" + "0" * 32 + "-" + "A" * 31,
        "other-" + "0" * 32 + "-" + "A" * 32,
    ],
)
def test_junk_reads_as_unknown_without_raising(junk):
    assert ResponseIds(SECRET).read(junk, tenant_id=7) is None


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ResponseIds(b"short")


def test_characters_outside_base64url_are_refused_though_the_decoder_would_skip_them():
    ids = ResponseIds(SECRET)
    response_id = signed(ids)
    assert ids.read(response_id[:-1] + ".", tenant_id=7) is None
    assert ids.read(response_id[:-2] + "=" + response_id[-1], tenant_id=7) is None
