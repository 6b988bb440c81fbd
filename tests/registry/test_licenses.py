"""PARTNER_ONLY enforced on SQLite and PostgreSQL: a version trained on partner data (the card's
licences or a dataset's) serves its owner only: it never joins an adapter shared with every
tenant or with named ones, and an adapter serving one is never shared; other tags change
nothing."""

from __future__ import annotations

import pytest

from registry import service
from registry.compat.problems import ProblemCode
from registry.errors import AdapterRejected, InvalidInput
from registry.service.licenses import partner_only
from registry.states import Visibility
from tests.registry.test_lifecycle_races import race

DATASET = {"name": "tickets", "sha256": "ab" * 32}


def card(licenses: list[str] | None = None, dataset_license: str | None = None) -> dict:
    dataset = {**DATASET, **({"license": dataset_license} if dataset_license else {})}
    return {
        "owner": "ml@acme",
        "objective": "sft",
        "licenses": licenses or [],
        "datasets": [dataset],
    }


PARTNER_CARDS = [card(["PARTNER_ONLY"]), card(dataset_license="PARTNER_ONLY")]


@pytest.mark.parametrize("partner", PARTNER_CARDS)
async def test_partner_data_never_joins_an_adapter_shared_with_every_tenant(world, partner):
    with pytest.raises(AdapterRejected) as refused:
        await world.register("open-bot", 1, visibility=Visibility.SHARED, card=partner)
    codes = [p.code for p in refused.value.problems]
    assert codes == [ProblemCode.LICENSE_PARTNER_ONLY]
    assert "every tenant" in refused.value.problems[0].message
    await world.register("open-bot", 1, visibility=Visibility.SHARED, card=card(["COMMERCIAL_OK"]))
    with pytest.raises(AdapterRejected):  # nor a new version of one
        await world.register("open-bot", 2, card=partner)


async def test_partner_data_never_joins_an_adapter_shared_with_other_tenants(world):
    await world.register("acme-bot", 1, card=card(["COMMERCIAL_OK"]))
    await service.share_adapter(world.session, name="acme-bot", tenant="globex", actor="root")
    with pytest.raises(AdapterRejected) as refused:
        await world.register("acme-bot", 2, card=PARTNER_CARDS[1])
    assert "1 other tenant" in refused.value.problems[0].message
    await service.unshare_adapter(world.session, name="acme-bot", tenant="globex", actor="root")
    assert await world.register("acme-bot", 2, card=PARTNER_CARDS[1]) == 2  # its owner's only


async def test_an_adapter_serving_partner_data_is_never_shared(world):
    await world.register("partner-bot", 1, card=PARTNER_CARDS[0])
    await world.register("partner-bot", 2, card=card(["COMMERCIAL_OK"]))
    with pytest.raises(InvalidInput, match=r"PARTNER_ONLY data \(v1\)"):
        await service.share_adapter(
            world.session, name="partner-bot", tenant="globex", actor="root"
        )
    assert await service.list_adapter_shares(world.session, name="partner-bot") == []
    await service.retire_version(world.session, name="partner-bot", version=1, actor="root")
    await service.share_adapter(world.session, name="partner-bot", tenant="globex", actor="root")
    assert await service.list_adapter_shares(world.session, name="partner-bot") == ["globex"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, False),
        (card(), False),
        (card(["COMMERCIAL_OK", "ATTRIBUTION_REQUIRED"], "SHAREALIKE"), False),
        (PARTNER_CARDS[0], True),
        (PARTNER_CARDS[1], True),
    ],
)
def test_partner_only_reads_the_cards_licences_and_its_datasets(given, expected):
    assert partner_only(given) is expected


@pytest.mark.parametrize("share_first", [True, False])
async def test_a_share_and_a_partner_only_registration_racing_decide_one_after_the_other(
    world, sessions, share_first
):
    """Each side holds the adapter's lock while it checks and writes (review: without the
    share's lock both went through, a PARTNER_ONLY version shared)."""
    await world.register("raced", 1, card=card(["COMMERCIAL_OK"]))

    async def share(session):
        await service.share_adapter(session, name="raced", tenant="globex", actor="root")

    async def register(session):
        await world.register("raced", 2, session=session, card=PARTNER_CARDS[0])

    first, second = (share, register) if share_first else (register, share)
    results = await race(sessions, first, second)
    assert results == (["ok", "AdapterRejected"] if share_first else ["ok", "PartnerOnlyData"])
    shares = await service.list_adapter_shares(world.session, name="raced")
    versions = [v.version for v in await service.list_versions(world.session, name="raced")]
    assert (shares, versions) == ((["globex"], [1]) if share_first else ([], [1, 2]))
