"""Stacks (seed §1 "training objective" and "stacking policy", (a)7): adapters that serve
together on one token segment, registered as one new adapter version whose weights are the
components' ranks side by side (registry.stack_weights: exact, not a merge).

What may be stacked is decided here, before any weights are read:
- each component resolves as the stack's tenant would address it (`name` is the stable,
  `name@N` exactly N), on the served base;
- the tenant's own adapters and adapters shared with every tenant only: an adapter another
  tenant shared with this one alone must not reach others through a stack that is shared on;
- every component has an Adaptation Card, and each one's stacking policy allows every other
  (`allow_listed` by objective or by adapter name; `exclusive`, the default, allows none): the
  seed's pairwise check, with the objectives feeding it;
- the ranks add up to at most the engine's max_lora_rank.

The stack's card carries what lineage and licences need (every component's datasets and licence
tags, so a dataset revocation finds the stack and PARTNER_ONLY data keeps it private), the first
component's objective, owner and chat template, and the recipe under `training`. No evaluations:
a stack is a new behaviour and is evaluated like any version. The stack is a copy: retiring a
component later leaves it serving (a dataset revocation still reaches it through the card).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from registry.card import AdaptationCard, parse_card
from registry.compat.problems import Problem, ProblemCode, capped
from registry.errors import AdapterNotFound, VersionNotFound
from registry.service.licenses import PARTNER_ONLY
from registry.service.queries import get_version
from registry.service.refusals import reject_registration
from registry.service.resolve import resolve_adapter
from registry.service.tenants import get_tenant
from registry.states import Visibility
from registry.store.base import ArtifactStore

MAX_COMPONENTS = 8
MAX_PROBLEMS = 24
# The Adaptation Card's own limits (registry.card), which the stack's joined card must meet.
MAX_DATASETS = AdaptationCard.model_fields["datasets"].metadata[0].max_length
MAX_TAGS = AdaptationCard.model_fields["tags"].metadata[0].max_length


@dataclass(frozen=True)
class StackPart:
    """One resolved component of a stack."""

    address: str  # name@N
    name: str
    weight: float
    rank: int
    card: AdaptationCard | None
    artifact_sha256: str  # the caller fetches it (store.get_path) after closing its session
    owned: bool  # the stack's tenant owns it (else it is shared with every tenant)


async def resolve_stack(
    session: AsyncSession,
    *,
    store: ArtifactStore,
    tenant: str,
    components: Sequence[tuple[str, float]],
    base_sha256: str,
) -> tuple[list[StackPart], list[Problem]]:
    """Each (address, weight) resolved for `tenant`; the parts and a problem per component
    that cannot be one (unknown, out of the tenant's scope, or borrowed). Raises
    TenantNotFound for an unknown tenant. Reads only: the artifacts are the caller's to fetch
    once its session is closed (a download inside it would hold a pooled connection idle in
    transaction, see registry.service.resolve)."""
    await get_tenant(session, name=tenant)
    parts: list[StackPart] = []
    problems: list[Problem] = []
    for address, weight in components:
        try:
            found = await resolve_adapter(
                session,
                store=store,
                model=address,
                tenant=tenant,
                base_sha256=base_sha256,
                with_path=False,
            )
        except (AdapterNotFound, VersionNotFound):
            problems.append(
                Problem(
                    ProblemCode.STACK_COMPONENT,
                    f"{address!r}: no servable adapter of that name that tenant {tenant!r} may "
                    "use on the served base",
                )
            )
            continue
        if found.tenant != tenant and found.visibility != Visibility.SHARED:
            problems.append(
                Problem(
                    ProblemCode.STACK_COMPONENT,
                    f"{found.address} belongs to tenant {found.tenant!r}, which shared it with "
                    f"{tenant!r} alone: a stack may hold the tenant's own adapters and adapters "
                    "shared with every tenant",
                )
            )
            continue
        row = await get_version(session, name=found.name, version=found.version)
        card, unreadable = parse_card(row.card)
        if unreadable:  # stored under an older schema: its policy cannot be read today
            problems.append(
                Problem(
                    ProblemCode.STACK_COMPONENT,
                    f"{found.address}'s stored card no longer validates "
                    f"({unreadable[0].message}): register a version with a current card",
                )
            )
            continue
        owned = found.tenant == tenant
        parts.append(
            StackPart(
                found.address, found.name, weight, found.rank, card, found.artifact_sha256, owned
            )
        )
    return parts, problems


def stacking_problems(parts: Sequence[StackPart], *, max_lora_rank: int) -> list[Problem]:
    """Why these parts may not serve together (pure): repeats, missing cards, any part whose
    stacking policy does not allow another, and a summed rank past the engine's limit."""
    problems: list[Problem] = []
    names = [part.name for part in parts]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(
            Problem(
                ProblemCode.STACK_COMPONENT,
                f"adapter {name!r} is listed more than once: give it one weight instead",
            )
        )
    for part in parts:
        if part.card is None:
            problems.append(
                Problem(
                    ProblemCode.STACKING_REFUSED,
                    f"{part.address} has no Adaptation Card, so its stacking policy is the "
                    "default, exclusive",
                )
            )
    for part in parts:
        if not part.owned and part.weight != 1:
            problems.append(
                Problem(
                    ProblemCode.STACKING_REFUSED,
                    f"{part.address} is another tenant's adapter (shared with every tenant): "
                    f"it is stacked as trained, weight 1, not {part.weight!r}",
                )
            )
    carded = [part for part in parts if part.card is not None]
    problems += _card_problems(carded)
    for holder, other in permutations(carded, 2):
        if not _allows(holder, other):
            problems.append(
                Problem(
                    ProblemCode.STACKING_REFUSED,
                    f"{holder.address}'s stacking policy ({_policy(holder)}) does not allow "
                    f"{other.address} (objective {_objective(other)})",
                )
            )
    rank = sum(part.rank for part in parts)
    if rank > max_lora_rank:
        summed = " + ".join(f"{part.address} r{part.rank}" for part in parts)
        problems.append(
            Problem(
                ProblemCode.RANK_EXCEEDS_LIMIT,
                f"the stack's rank would be {rank} ({summed}), over the engine's max_lora_rank "
                f"of {max_lora_rank}",
            )
        )
    return capped(
        problems, limit=MAX_PROBLEMS, code=ProblemCode.STACKING_REFUSED, what="stacking problems"
    )


def _card_problems(carded: Sequence[StackPart]) -> list[Problem]:
    """What would keep the stack's card (the components' cards joined) from being valid."""
    cards = [part.card for part in carded if part.card is not None]
    problems = []
    templates = {card.chat_template for card in cards if card.chat_template is not None}
    if len(templates) > 1:
        problems.append(
            Problem(
                ProblemCode.STACKING_REFUSED,
                "the components' cards give different chat templates: a stack renders prompts "
                "one way",
            )
        )
    datasets = {dataset.sha256 for card in cards for dataset in card.datasets}
    tags = {tag for card in cards for tag in card.tags}
    for what, count, limit in (
        ("datasets", len(datasets), MAX_DATASETS),
        ("tags", len(tags), MAX_TAGS),
    ):
        if count > limit:
            problems.append(
                Problem(
                    ProblemCode.STACKING_REFUSED,
                    f"the components' cards list {count} distinct {what}; a card holds at most "
                    f"{limit}",
                )
            )
    return problems


def _allows(holder: StackPart, other: StackPart) -> bool:
    assert holder.card is not None and other.card is not None
    policy = holder.card.stacking
    return policy.mode == "allow_listed" and (
        other.card.objective in policy.with_objectives or other.name in policy.with_adapters
    )


def _policy(part: StackPart) -> str:
    assert part.card is not None
    policy = part.card.stacking
    if policy.mode == "exclusive":
        return "exclusive"
    allowed = []
    if policy.with_objectives:
        allowed.append(f"objectives {', '.join(o.value for o in policy.with_objectives)}")
    if policy.with_adapters:
        allowed.append(f"adapters {', '.join(policy.with_adapters)}")
    return "allows " + " and ".join(allowed)


def _objective(part: StackPart) -> str:
    assert part.card is not None
    return part.card.objective.value


def stack_card(
    parts: Sequence[StackPart],
    *,
    tenant: str,
    base_sha256: str,
    description: str | None = None,
    rollback_path: str = "base",
) -> dict[str, Any]:
    """The new version's Adaptation Card (JSON), from parts whose cards all exist. Owner and
    alert id are those of the first component `tenant` owns (else the tenant's name and none):
    another tenant's shared adapter does not make its contact the stack's."""
    cards = [part.card for part in parts if part.card is not None]
    assert len(cards) == len(parts), "stacking_problems refuses parts without a card"
    first = cards[0]
    own = next((part.card for part in parts if part.owned and part.card is not None), None)
    datasets: dict[str, dict[str, Any]] = {}
    for card in cards:
        for dataset in card.datasets:
            listed = datasets.setdefault(dataset.sha256, dataset.model_dump(mode="json"))
            # one card may name a licence another leaves out: the most restrictive holds
            stricter = listed["license"] is None or dataset.license == PARTNER_ONLY
            if dataset.license is not None and listed["license"] != PARTNER_ONLY and stricter:
                listed["license"] = dataset.license.value
    recipe = " + ".join(f"{part.weight!r} x {part.address}" for part in parts)
    stacked: dict[str, Any] = {
        "owner": own.owner if own else tenant,
        "alert_id": own.alert_id if own else None,
        "objective": first.objective.value,
        "description": description or f"stack of {recipe}",
        "base_sha256": base_sha256,
        "tokenizer_sha256": first.tokenizer_sha256,
        "rollback_path": rollback_path,
        "datasets": list(datasets.values()),
        "licenses": _union(license.value for card in cards for license in card.licenses),
        "tags": _union(tag for card in cards for tag in card.tags),
        "training": {
            "stack_method": "concat",
            "stack_of": " ".join(part.address for part in parts),
            "stack_weights": " ".join(repr(part.weight) for part in parts),
        },
        "chat_template": next((c.chat_template for c in cards if c.chat_template), None),
    }
    return {key: value for key, value in stacked.items() if value is not None}


def _union(values: Any) -> list[str]:
    return list(dict.fromkeys(values))


async def refuse_stack(
    session: AsyncSession, *, actor: str, name: str, tenant: str, problems: list[Problem]
) -> None:
    """Record the refused stack in the audit log and raise AdapterRejected with every reason."""
    await reject_registration(
        session, actor=actor, name=name, tenant=tenant, problems=problems, stack=True
    )
