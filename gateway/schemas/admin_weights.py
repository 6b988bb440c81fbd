"""Admin payloads for versions made from other versions' weights: stacks, the rank
spectrum, truncations and what was derived from a version."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from gateway.schemas.admin import Payload, Strict, example
from registry.service.stacking import MAX_COMPONENTS as MAX_STACK_COMPONENTS


class StackComponent(Payload):
    adapter: str = Field(max_length=80, description="An adapter (its stable) or name@N.")
    weight: float = Field(
        1.0,
        ge=-16,
        le=16,
        allow_inf_nan=False,
        description="What its delta is multiplied by in the stack (1: as trained).",
    )

    @model_validator(mode="after")
    def _nonzero(self) -> Self:
        if self.weight == 0:
            raise ValueError("a component of weight 0 changes nothing: leave it out")
        return self


class StackAdapter(Payload):
    name: str
    tenant: str = Field(description="The owning tenant; the components resolve as it would.")
    components: list[StackComponent] = Field(min_length=2, max_length=MAX_STACK_COMPONENTS)
    # A new adapter's visibility (default private); omitted, a new version keeps the adapter's.
    visibility: Literal["private", "shared"] | None = None
    description: str | None = Field(None, max_length=4000)
    rollback_path: str = Field("base", max_length=80, description="'base' or name[@N].")

    model_config = example(
        {
            "name": "support-bot-guarded",
            "tenant": "acme",
            "components": [{"adapter": "support-bot"}, {"adapter": "safety-guard@3"}],
        }
    )


class ModuleSpectrumOut(Strict):
    module: str
    rank_needed: int
    singular_values: list[float]


class SpectrumOut(Strict):
    """How much of its rank a version uses: per module, the singular values of its delta
    (scale·B·A) and the rank that keeps `energy` of it."""

    name: str
    version: int
    rank: int
    energy: float
    rank_needed: int = Field(description="The rank at which every module keeps `energy`.")
    warnings: list[str]
    modules: list[ModuleSpectrumOut]

    model_config = example(
        {
            "name": "support-bot",
            "version": 2,
            "rank": 16,
            "energy": 0.95,
            "rank_needed": 5,
            "warnings": [
                "every module keeps 95% of its delta at rank 5 of 16: a version truncated to "
                "rank 5 takes 31% of the memory"
            ],
            "modules": [
                {
                    "module": "model.layers.0.self_attn.q_proj",
                    "rank_needed": 4,
                    "singular_values": [3.1, 1.2, 0.4, 0.2, 0.05],
                }
            ],
        }
    )


class DerivedVersionOut(Strict):
    adapter: str
    tenant: str
    version: int
    state: str
    how: Literal["stack", "truncation"]


class DerivedOut(Strict):
    """Versions made from this version's weights: they keep serving them after it is retired."""

    adapter: str
    version: int
    data: list[DerivedVersionOut]

    model_config = example(
        {
            "adapter": "support-bot",
            "version": 2,
            "data": [
                {
                    "adapter": "support-bot-guarded",
                    "tenant": "acme",
                    "version": 1,
                    "state": "production",
                    "how": "stack",
                }
            ],
        }
    )


class TruncateVersion(Payload):
    """Exactly one of `rank` or `energy`."""

    rank: int | None = Field(None, ge=1, le=512)
    energy: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    reason: str | None = Field(None, max_length=500)

    model_config = example({"energy": 0.95, "reason": "frees pool pages"})

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        return self
