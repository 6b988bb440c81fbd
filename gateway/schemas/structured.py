"""Structured outputs on the wire: OpenAI's `response_format` and vLLM's `structured_outputs`.

Both name a constraint the engine enforces token by token (vLLM's structured outputs: every
token that would break it is masked), so the output matches the JSON schema, regex, choice or
grammar by construction, not by the adapter's goodwill. Parsed here into one OutputConstraint;
what the engine's grammar backend cannot compile is its 400, attributed to the field it came
from (gateway.engine.vllm_embedded).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.engine.client import OutputConstraint

# vLLM compiles a constraint twice: to check it, in the gateway process (a worker thread), and
# to enforce it, in the engine core (one compile thread for every tenant). Compile time grows
# with the constraint (xgrammar: ~1.3 ms per KiB of JSON schema with the demo's 693-token
# vocabulary, more with a real one), so one request's is bounded; real schemas are a few KiB.
MAX_CONSTRAINT_CHARS = 32 * 1024
# JSON Schema names in OpenAI's json_schema format.
SCHEMA_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _too_large(size: int) -> PydanticCustomError:
    return PydanticCustomError(
        "constraint_too_large",
        "The structured output constraint is {size} characters; at most {limit} are allowed.",
        {"size": size, "limit": MAX_CONSTRAINT_CHARS},
    )


def _schema_text(schema: Any) -> str:
    """A JSON schema as compact JSON text (one spelling, bounded in size)."""
    if isinstance(schema, str):  # vLLM's extension takes the schema as a JSON string too
        if len(schema) > MAX_CONSTRAINT_CHARS:
            raise _too_large(len(schema))
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise PydanticCustomError(
                "schema_not_json", "The JSON schema is not valid JSON: {reason}.", {"reason": exc}
            ) from None
    if not isinstance(schema, dict):
        raise PydanticCustomError("schema_not_object", "A JSON schema must be a JSON object.")
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise _too_large(len(text))
    return text


def _bounded(text: str) -> str:
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise _too_large(len(text))
    return text


class JsonSchemaFormat(BaseModel):
    # OpenAI's fields; unknown ones are accepted and ignored, as on the rest of the surface.
    # The schema is read by its wire name only (a `json_schema` key is an unknown field).
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=SCHEMA_NAME_PATTERN)
    description: str | None = None
    # `schema` shadows a BaseModel attribute: held under another name, read by its wire name.
    json_schema: dict[str, Any] = Field(alias="schema")
    # OpenAI's strict false allows outputs outside the schema; loraplex always enforces it,
    # which every strict-false client accepts too.
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _bounded_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        _schema_text(value)
        return value


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _known_type(self) -> ResponseFormat:
        if self.type not in ("text", "json_object", "json_schema"):
            raise PydanticCustomError(
                "unsupported",
                "loraplex does not support response_format of type {kind!r} yet "
                "(only 'text', 'json_object' and 'json_schema').",
                {"kind": self.type},
            )
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "json_schema_missing",
                "response_format of type 'json_schema' needs its json_schema object "
                "(name and schema).",
            )
        return self

    def constraint(self) -> OutputConstraint | None:
        if self.type == "json_object":
            return OutputConstraint("json_object", None, "response_format")
        if self.type == "json_schema" and self.json_schema is not None:
            text = json.dumps(self.json_schema.json_schema, separators=(",", ":"))
            return OutputConstraint("json", text, "response_format")
        return None


class StructuredOutputs(BaseModel):
    """vLLM's extension: exactly one constraint. Its other knobs are engine-wide in vLLM 0.32
    (whitespace) or not honoured by its backends per request, so they are refused, not
    ignored."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: Literal[True] | None = None

    @field_validator("json_")
    @classmethod
    def _schema_as_text(cls, value: dict[str, Any] | str | None) -> str | None:
        return None if value is None else _schema_text(value)

    @field_validator("regex", "grammar")
    @classmethod
    def _bounded_text(cls, value: str | None) -> str | None:
        return None if value is None else _bounded(value)

    @field_validator("choice")
    @classmethod
    def _bounded_choices(cls, value: list[str] | None) -> list[str] | None:
        # Each choice is one branch of the grammar however short: millions of empty strings
        # took the engine seconds per request. Counted as the JSON list they are.
        if value is not None:
            # Two quotes and a comma each, before encoding anything: one dumps of millions
            # of items held the event loop for seconds.
            if 3 * len(value) > MAX_CONSTRAINT_CHARS:
                raise _too_large(3 * len(value))
            size = len(json.dumps(value))
            if size > MAX_CONSTRAINT_CHARS:
                raise _too_large(size)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            name
            for name, value in (
                ("json", self.json_),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise PydanticCustomError(
                "one_constraint",
                "structured_outputs takes exactly one of json, regex, choice, grammar and "
                "json_object; got {given}.",
                {"given": ", ".join(given) or "none"},
            )
        return self

    def constraint(self) -> OutputConstraint:
        param = "structured_outputs"
        if self.json_ is not None:
            return OutputConstraint("json", str(self.json_), param)  # compact text by now
        if self.regex is not None:
            return OutputConstraint("regex", self.regex, param)
        if self.choice is not None:
            return OutputConstraint("choice", tuple(self.choice), param)
        if self.grammar is not None:
            return OutputConstraint("grammar", self.grammar, param)
        return OutputConstraint("json_object", None, param)
