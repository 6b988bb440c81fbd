"""Dataset lineage on SQLite and PostgreSQL: the versions whose Adaptation Card lists a dataset,
whatever their state or tenant, and no version whose card only mentions the digest elsewhere."""

from __future__ import annotations

import pytest

from registry import service
from registry.errors import InvalidInput
from registry.states import VersionState, Visibility

PARTNER = "ab" * 32
OTHER = "cd" * 32


def card(*datasets: dict[str, object], base_sha256: str | None = None) -> dict[str, object]:
    return {
        "owner": "ml@acme",
        "objective": "sft",
        "datasets": list(datasets),
        **({"base_sha256": base_sha256} if base_sha256 else {}),
    }


async def test_every_version_trained_on_a_dataset_is_found(world) -> None:
    partner = {"name": "partner-tickets", "sha256": PARTNER, "license": "PARTNER_ONLY"}
    other = {"name": "public-faq", "sha256": OTHER}
    await world.register("support", 1, card=card(partner))
    await world.register("support", 2, card=card(other))
    await world.register("support", 3, card=card(other, {**partner, "sha256": "sha256:" + PARTNER}))
    await world.register(
        "extractor", 4, tenant="globex", card=card({**partner, "license": "SHAREALIKE"})
    )
    await world.register("plain", 5)  # no card
    await world.register("claims", 6, card=card(other))
    await service.retire_version(world.session, name="support", version=1, actor="root")

    found = await service.versions_trained_on(world.session, dataset_sha256=PARTNER.upper())
    assert [(f.adapter, f.version, f.tenant, f.state) for f in found] == [
        ("extractor", 1, "globex", VersionState.COMPATIBLE),
        ("support", 1, "acme", VersionState.RETIRED),
        ("support", 3, "acme", VersionState.COMPATIBLE),
    ]
    # What each card says of the dataset (a licence is the card's claim, per version).
    assert [(f.dataset_name, f.dataset_license) for f in found] == [
        ("partner-tickets", "SHAREALIKE"),
        ("partner-tickets", "PARTNER_ONLY"),
        ("partner-tickets", "PARTNER_ONLY"),
    ]
    assert all(f.visibility is Visibility.PRIVATE for f in found)
    same = await service.versions_trained_on(world.session, dataset_sha256="sha256:" + PARTNER)
    assert same == found
    by_other = await service.versions_trained_on(world.session, dataset_sha256=OTHER)
    assert [(f.adapter, f.version) for f in by_other] == [
        ("claims", 1),
        ("support", 2),
        ("support", 3),
    ]
    assert await service.versions_trained_on(world.session, dataset_sha256="ef" * 32) == []


async def test_a_digest_elsewhere_in_a_card_is_no_dataset(world, base_fp) -> None:
    base = base_fp.weights_sha256
    await world.register("based", 1, card=card({"name": "faq", "sha256": OTHER}, base_sha256=base))
    assert await service.versions_trained_on(world.session, dataset_sha256=base) == []


@pytest.mark.parametrize(
    "value", ["", "ab" * 31, "zz" * 32, "sha256:" + "ab" * 31, "md5:" + PARTNER]
)
async def test_a_dataset_is_named_by_its_sha256(session, value: str) -> None:
    with pytest.raises(InvalidInput):
        await service.versions_trained_on(session, dataset_sha256=value)


def made_from(**training: str) -> dict:
    return {"owner": "ml@acme", "objective": "sft", "training": training}


async def test_versions_derived_from_a_version_are_found_by_its_exact_address(world):
    await world.register("src", 1, card=made_from())
    await world.register("guarded", 2, card=made_from(stack_of="src@1 guard@3"))
    await world.register("guarded", 3, card=made_from(stack_of="other@1 src@10"))  # not src@1
    await world.register("small", 4, card=made_from(truncated_from="src@1"))
    await world.register("small", 5, card=made_from(truncated_from="xsrc@1"))  # another name
    await world.register("copy", 6, tenant="globex", card=made_from(stack_of="guard@3 src@1"))
    await world.register("notes", 7, card=made_from(note="src@1 was the source"))  # free text
    found = await service.versions_derived_from(world.session, name="src", version=1)
    assert [(d.adapter, d.version, d.tenant, d.how) for d in found] == [
        ("copy", 1, "globex", "stack"),
        ("guarded", 1, "acme", "stack"),
        ("small", 1, "acme", "truncation"),
    ]
    await service.retire_version(world.session, name="small", version=1, actor="root")
    again = await service.versions_derived_from(world.session, name="src", version=1)
    assert [(d.adapter, d.state.value) for d in again][-1] == ("small", "retired")
    assert await service.versions_derived_from(world.session, name="src", version=2) == []
