"""Version lifecycle (seed §7): registered → compatible → evaluated → shadow → canary 1/10/50 →
production, plus rolled_back, retired and deleted.

Registration runs the compatibility gate first, so a stored version starts as `compatible`;
`registered` exists for importers that record a version before gating it. Promotion along the
ladder is registry.service.rollout's; this module only says which moves are legal. A canary
starts from `evaluated` (or `shadow`: a shadow gets copies of the stable's requests, its output
discarded; stopping it returns it to `evaluated`); a rolled-back version may start a canary
again only when an operator forces it (its rollback may have been an infrastructure incident,
and its bytes cannot be registered a second time). A stable version that breaches keeps its
state: its traffic moves to the rollback target (an adapter-level routing change, undone by
restoring it).

A deleted version stays as a tombstone row so its number is never reused and the audit trail
keeps pointing at something; only its artifact goes (once no other version references it).
Live versions (shadow, canary, production) must be rolled back or retired before deletion.
"""

from __future__ import annotations

from enum import StrEnum

from registry.errors import InvalidStateTransition


class VersionState(StrEnum):
    REGISTERED = "registered"
    COMPATIBLE = "compatible"
    EVALUATED = "evaluated"
    SHADOW = "shadow"
    CANARY_1 = "canary_1"
    CANARY_10 = "canary_10"
    CANARY_50 = "canary_50"
    PRODUCTION = "production"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"
    DELETED = "deleted"


class Visibility(StrEnum):
    PRIVATE = "private"  # only the owner tenant may address it
    SHARED = "shared"  # every tenant may (e.g. safety guardrails)


S = VersionState
# States in which a version may answer client traffic: as `name@N`, and as the bare `name` when
# it is the adapter's stable. A compatible version is servable so that an adapter's first
# version serves at once; a later one does not take over the name on registration (the name's
# version is pinned as the stable then, registry.service.adapters.pin_served_version): it
# reaches the name through a canary.
SERVABLE: frozenset[VersionState] = frozenset(
    {S.COMPATIBLE, S.EVALUATED, S.CANARY_1, S.CANARY_10, S.CANARY_50, S.PRODUCTION}
)
# An exact `name@N` may also reach a shadow version (the gateway mirrors traffic to it).
ADDRESSABLE: frozenset[VersionState] = SERVABLE | {S.SHADOW}

TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    S.REGISTERED: frozenset({S.COMPATIBLE, S.RETIRED, S.DELETED}),
    S.COMPATIBLE: frozenset({S.EVALUATED, S.RETIRED, S.DELETED}),
    S.EVALUATED: frozenset({S.SHADOW, S.CANARY_1, S.RETIRED, S.DELETED}),
    # Back to evaluated when a shadow stops: mirroring judges nothing by itself (an operator
    # reads its divergence and latency, then starts a canary, retires it or rolls it back).
    S.SHADOW: frozenset({S.EVALUATED, S.CANARY_1, S.ROLLED_BACK, S.RETIRED}),
    S.CANARY_1: frozenset({S.CANARY_10, S.ROLLED_BACK, S.RETIRED}),
    S.CANARY_10: frozenset({S.CANARY_50, S.ROLLED_BACK, S.RETIRED}),
    S.CANARY_50: frozenset({S.PRODUCTION, S.ROLLED_BACK, S.RETIRED}),
    S.PRODUCTION: frozenset({S.ROLLED_BACK, S.RETIRED}),
    S.ROLLED_BACK: frozenset({S.CANARY_1, S.RETIRED, S.DELETED}),
    S.RETIRED: frozenset({S.DELETED}),
    S.DELETED: frozenset(),
}


def check_transition(current: VersionState, target: VersionState, *, what: str) -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing"
        raise InvalidStateTransition(
            f"{what} is {current.value}; it cannot become {target.value} (allowed: {allowed})"
        )
