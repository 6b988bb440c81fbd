"""Tool calling on the wire (OpenAI's chat `tools`, `tool_choice`, tool messages) and the
constraint that makes a forced call well-formed.

A forced call (`tool_choice` "required" or a named function) is generated under a JSON schema
built from the tools (as vLLM's server builds it), so its arguments match the function's
`parameters` by construction, whatever the model or adapter. "auto" leaves the call to the
model, in its own syntax, which the deployment's parser finds (gateway.engine.tool_parsing).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from gateway.engine.client import OutputConstraint
from gateway.schemas.structured import MAX_CONSTRAINT_CHARS

# OpenAI's limits: at most 128 tools, names of letters, digits, _ and - up to 64.
MAX_TOOLS = 128
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# Where JSON Schema keeps the definitions that "#/$defs/..." (2019+) and "#/definitions/..."
# (draft 7: zod-to-json-schema, older pydantic) references point to: the root.
DEFINITION_KEYS = ("$defs", "definitions")


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's unknown fields are ignored


class FunctionDefinition(WireModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # enforced either way, as for response_format

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        # OpenAI's arguments are a JSON object: a string schema made string arguments.
        kind = value.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise PydanticCustomError(
                "parameters_not_object", "A function's parameters must describe a JSON object."
            )
        for key in DEFINITION_KEYS:
            if not isinstance(value.get(key) or {}, dict):
                raise PydanticCustomError(
                    "definitions_not_object",
                    "{key} in a function's parameters must be an object.",
                    {"key": key},
                )
        return value


class ToolDefinition(WireModel):
    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        """As chat templates take tools (transformers' apply_chat_template(tools=...))."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(WireModel):
    name: str
    # JSON text, as OpenAI sends and returns it; an object or null, as some clients replay it.
    arguments: str | dict[str, Any] | None = None


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """Arguments as a dict: what tool-use chat templates expect. Anything that is not a
        JSON object becomes {}, as vLLM's server does with what is not JSON: the call is
        history, and refusing it would fail every later turn of the conversation."""
        arguments: Any = self.function.arguments or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):  # not JSON; nested past the decoder's limit
                arguments = {}
        # What the decoder read, the template's tojson writes back: no depth check needed.
        if not isinstance(arguments, dict):
            arguments = {}
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": arguments},
        }


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def forced_call_schema(
    tools: list[ToolDefinition], choice: ToolChoice | None, parallel: bool | None
) -> dict[str, Any] | None:
    """The JSON schema a forced call is generated under; None when no call is forced.

    Named: the function's parameters (any object when it has none). Required: an array of at
    least one {"name", "parameters"} object, each name with its own parameters (at most one
    call when parallel_tool_calls is false). Each tool's `$defs` and
    `definitions` move to the root, where their references point once the parameters are nested."""
    if isinstance(choice, NamedToolChoice):
        wanted = next(t for t in tools if t.function.name == choice.function.name)
        return wanted.function.parameters or dict(EMPTY_PARAMETERS)
    if choice != "required":
        return None
    definitions: dict[str, dict[str, Any]] = {}
    calls = []
    for tool in tools:
        parameters = dict(tool.function.parameters or EMPTY_PARAMETERS)  # what moves is popped
        for key in DEFINITION_KEYS:
            for name, definition in (parameters.pop(key, None) or {}).items():
                if definitions.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise PydanticCustomError(
                        "conflicting_defs",
                        "Two tools define {key}/{name} differently; one call schema for all "
                        "the tools cannot hold both.",
                        {"key": key, "name": name},
                    )
        calls.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": calls},
    }
    if parallel is False:
        schema["maxItems"] = 1
    schema.update(definitions)
    return schema


def forced_call_constraint(schema: dict[str, Any]) -> OutputConstraint:
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise PydanticCustomError(
            "constraint_too_large",
            "The tools' call schema is {size} characters; at most {limit} are allowed.",
            {"size": len(text), "limit": MAX_CONSTRAINT_CHARS},
        )
    return OutputConstraint("json", text, "tools")
