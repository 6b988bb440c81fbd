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
