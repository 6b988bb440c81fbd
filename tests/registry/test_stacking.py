"""Which adapters may serve stacked (pure rules: the cards' stacking policies pairwise, repeats,
missing cards, the summed rank) and the stack's card (lineage and licences carried over)."""

from __future__ import annotations

from typing import Any

import pytest

from registry.card import AdaptationCard, parse_card
from registry.compat.problems import ProblemCode
from registry.service.licenses import partner_only
from registry.service.stacking import StackPart, stack_card, stacking_problems

SAFETY = {"mode": "allow_listed", "with_objectives": ["safety_guardrail"]}
ANY_TASK = {"mode": "allow_listed", "with_objectives": ["sft", "dpo"]}


def card(objective: str = "sft", stacking: dict[str, Any] | None = None, **more: Any):
    fields = {"owner": "ml@example.com", "objective": objective, **more}
    if stacking is not None:
        fields["stacking"] = stacking
    return AdaptationCard.model_validate(fields)


def part(
    name: str,
    card_: AdaptationCard | None,
    rank: int = 8,
    version: int = 1,
    *,
    weight: float = 1.0,
    owned: bool = True,
) -> StackPart:
    return StackPart(f"{name}@{version}", name, weight, rank, card_, "ab" * 32, owned)


TASK = part("task", card("sft", SAFETY))
GUARD = part("guard", card("safety_guardrail", ANY_TASK))


@pytest.mark.parametrize(
    ("parts", "codes", "fragment"),
    [
        ([TASK, GUARD], [], ""),
        # both directions must allow: the guard allows sft, an exclusive task allows nothing
        (
            [part("task", card("sft")), GUARD],
            [ProblemCode.STACKING_REFUSED],
            "task@1's stacking policy (exclusive) does not allow guard@1",
        ),
        (
            [TASK, part("guard", card("safety_guardrail"))],
            [ProblemCode.STACKING_REFUSED],
            "guard@1's stacking policy (exclusive) does not allow task@1",
        ),
        # an objective the policy does not list
        (
            [TASK, part("other", card("dpo", ANY_TASK))],
            [ProblemCode.STACKING_REFUSED],
            "allows objectives safety_guardrail) does not allow other@1 (objective dpo)",
        ),
        # allowed by name instead of objective
        (
            [
                part("task", card("sft", {"mode": "allow_listed", "with_adapters": ["tone"]})),
                part("tone", card("dpo", {"mode": "allow_listed", "with_adapters": ["task"]})),
            ],
            [],
            "",
        ),
        ([part("task", None), GUARD], [ProblemCode.STACKING_REFUSED], "has no Adaptation Card"),
        (
            [TASK, part("task", card("sft", SAFETY), version=2), GUARD],
            [ProblemCode.STACK_COMPONENT] + [ProblemCode.STACKING_REFUSED] * 2,
            "'task' is listed more than once",
        ),
        # another tenant's adapter is stacked as trained: no other weight, not negated
        (
            [TASK, part("guard", GUARD.card, weight=-1.0, owned=False)],
            [ProblemCode.STACKING_REFUSED],
            "guard@1 is another tenant's adapter (shared with every tenant): it is stacked as "
            "trained, weight 1, not -1.0",
        ),
        ([TASK, part("guard", GUARD.card, owned=False)], [], ""),
        ([TASK, part("guard", GUARD.card, weight=-1.0)], [], ""),  # the tenant's own: any weight
        (
            [
                part("task", card("sft", SAFETY, chat_template="a")),
                part("guard", card("safety_guardrail", ANY_TASK, chat_template="b")),
            ],
            [ProblemCode.STACKING_REFUSED],
            "different chat templates",
        ),
        (
            [
                part("task", card("sft", SAFETY, tags=[f"a{i}" for i in range(20)])),
                part(
                    "guard", card("safety_guardrail", ANY_TASK, tags=[f"b{i}" for i in range(13)])
                ),
            ],
            [ProblemCode.STACKING_REFUSED],
            "list 33 distinct tags; a card holds at most 32",
        ),
        (
            [part("task", card("sft", SAFETY), rank=16), part("guard", GUARD.card, rank=24)],
            [ProblemCode.RANK_EXCEEDS_LIMIT],
            "rank would be 40 (task@1 r16 + guard@1 r24), over the engine's max_lora_rank of 32",
        ),
    ],
)
def test_stacking_rules(parts, codes, fragment):
    problems = stacking_problems(parts, max_lora_rank=32)
    assert [p.code for p in problems] == codes, problems
    assert fragment in " ".join(p.message for p in problems)


def test_three_parts_are_checked_pairwise():
    tone = part("tone", card("dpo", {"mode": "allow_listed", "with_objectives": ["sft"]}))
    problems = stacking_problems([TASK, GUARD, tone], max_lora_rank=64)
    messages = [p.message for p in problems]
    # task does not list dpo; the guard allows dpo; tone lists neither the guard's objective
    assert any(m.startswith("task@1's") and "tone@1" in m for m in messages)
    assert any(m.startswith("tone@1's") and "guard@1" in m for m in messages)
    assert not any(m.startswith("guard@1's") for m in messages)


def test_the_stack_card_carries_lineage_licences_and_the_recipe():
    shared = {"name": "tickets", "sha256": "aa" * 32, "license": "COMMERCIAL_OK"}
    partner = {"name": "partner", "sha256": "bb" * 32, "license": "PARTNER_ONLY"}
    task = part(
        "task",
        card(
            "sft",
            SAFETY,
            datasets=[shared],
            licenses=["ATTRIBUTION_REQUIRED"],
            tags=["support"],
            chat_template="{{ messages }}",
        ),
    )
    guard_card = card("safety_guardrail", ANY_TASK, datasets=[shared, partner], owner="g@x")
    guard = StackPart("guard@3", "guard", 0.5, 4, guard_card, "ab" * 32, False)
    stacked = stack_card(
        [guard, task], tenant="acme", base_sha256="cc" * 32, rollback_path="task@1"
    )

    parsed, problems = parse_card(stacked)
    assert problems == [] and parsed is not None
    assert parsed.objective.value == "safety_guardrail"  # the first component's
    assert parsed.owner == "ml@example.com"  # the tenant's own component's, not guard's owner
    assert [d.sha256 for d in parsed.datasets] == ["aa" * 32, "bb" * 32]
    assert partner_only(parsed)  # PARTNER_ONLY data keeps the stack to its owner
    assert [lic.value for lic in parsed.licenses] == ["ATTRIBUTION_REQUIRED"]
    assert parsed.tags == ["support"]
    assert parsed.stacking.mode == "exclusive" and parsed.merge_policy.value == "dynamic"
    assert parsed.evals == []  # a stack is evaluated as itself
    assert parsed.rollback_path == "task@1" and parsed.chat_template == "{{ messages }}"
    assert parsed.training == {
        "stack_method": "concat",
        "stack_of": "guard@3 task@1",
        "stack_weights": "0.5 1.0",
    }
    assert parsed.description == "stack of 0.5 x guard@3 + 1.0 x task@1"
    assert parsed.base_sha256 == "cc" * 32


def test_a_dataset_partner_only_in_any_components_card_is_partner_only_in_the_stacks():
    unlabelled = {"name": "tickets", "sha256": "ab" * 32}
    labelled = {**unlabelled, "license": "PARTNER_ONLY"}
    commercial = {**unlabelled, "license": "COMMERCIAL_OK"}
    for first, second in ((unlabelled, labelled), (commercial, labelled), (labelled, commercial)):
        parts = [
            part("task", card("sft", SAFETY, datasets=[first])),
            part("guard", card("safety_guardrail", ANY_TASK, datasets=[second])),
        ]
        stacked = stack_card(parts, tenant="acme", base_sha256="cc" * 32)
        assert [d["license"] for d in stacked["datasets"]] == ["PARTNER_ONLY"], (first, second)
        assert partner_only(stacked)
    parts = [
        part("task", card("sft", SAFETY, datasets=[unlabelled])),
        part("guard", card("safety_guardrail", ANY_TASK, datasets=[commercial])),
    ]
    stacked = stack_card(parts, tenant="acme", base_sha256="cc" * 32)
    assert [d["license"] for d in stacked["datasets"]] == ["COMMERCIAL_OK"]


def test_a_stack_of_only_shared_adapters_is_owned_by_its_tenant():
    parts = [
        part("task", card("sft", SAFETY, alert_id="SEV1"), owned=False),
        part("guard", GUARD.card, owned=False),
    ]
    stacked = stack_card(parts, tenant="acme", base_sha256="cc" * 32)
    assert stacked["owner"] == "acme" and "alert_id" not in stacked
