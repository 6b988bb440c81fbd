"""Whether a call the model wrote under tool_choice "auto" is one the client can make: a
function it was given, with arguments that are a JSON object matching that function's
`parameters` (the seed's tool-call success, as far as the gateway can judge it without running
the tool). Counted per version in loraplex_tool_calls_total, and evidence for its rollout: a
fine-tune that writes broken calls shows before any caller's feedback does.

The judge runs on the event loop every stream shares, over a client's schema and a model's
output, so it is its own small JSON Schema checker with bounded work, not a general validator
(jsonschema fetched remote `$ref`s, exploded on `anyOf`/`$ref` chains and `unevaluated*`,
went quadratic on `uniqueItems`, and its regular expressions could take the machine's memory):
- it checks the keywords that describe a call's shape: type, enum, const, properties,
  required, additionalProperties, min/maxProperties, items, prefixItems, min/maxItems,
  min/maxLength, minimum, maximum, exclusiveMinimum/Maximum, allOf, anyOf, local $ref;
- every other keyword is not checked, and only ever in the direction of "valid": `oneOf` is
  read as `anyOf`, `not` and `if` are skipped (with looser branches they could only wrongly
  fail), no `pattern` runs, and `additionalProperties` is not enforced beside
  `patternProperties`. "valid" means no checked keyword failed;
- `$schema` draft 4-7 keeps its rules where they are looser ($ref's siblings ignored; no
  prefixItems before 2020-12), and OpenAPI's `nullable: true` admits null;
- one request's checks share JUDGE_STEPS steps (schema nodes, list entries, pointer parts,
  enum nodes compared); past them, calls are unjudged (neither counted nor evidence), as are
  references that are not a JSON pointer into the root resource (never fetched) and numbers
  Python's parser cannot hold (1e400, 5000 digits).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

Outcome = Literal["valid", "unknown_function", "invalid_arguments", "malformed"]

# Schema nodes visited (and enum members compared) by one request's checks, all choices.
JUDGE_STEPS = 20_000

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


class _Unjudged(Exception):
    pass


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: strict JSON clients refuse them


def parse_strict_json(text: str) -> tuple[bool, Any]:
    """(True, value) for strict JSON that Python's parser holds; (False, None) otherwise
    (invalid, NaN/Infinity, or numbers past what the checker judges)."""
    try:
        return True, json.loads(text, parse_constant=_no_constants, parse_int=_int)
    except (_Unjudged, RecursionError, ValueError):
        return False, None


class CallChecker:
    def __init__(self, tools: list[dict[str, Any]]):
        """`tools`: as chat templates take them ({"type": "function", "function": {...}})."""
        self._parameters = {
            tool["function"]["name"]: tool["function"].get("parameters") for tool in tools
        }
        self._steps_left = JUDGE_STEPS
        self._root: dict[str, Any] = {}
        self._before_2020 = False  # the schema's $schema is draft 4-7 or 2019-09

    def outcome(self, name: str, arguments: str) -> Outcome | None:
        """The call's outcome; None when it cannot be judged within the bounds above."""
        if name not in self._parameters:
            return "unknown_function"
        try:
            value = json.loads(arguments, parse_constant=_no_constants, parse_int=_int)
        except (_Unjudged, RecursionError):  # JSON, but past what Python's parser takes
            return None
        except ValueError:
            return "invalid_arguments"
        if not isinstance(value, dict):
            return "invalid_arguments"
        schema = self._parameters[name]
        if not schema:
            return "valid"
        fits = self.fits_schema(value, schema)
        return None if fits is None else "valid" if fits else "invalid_arguments"

    def fits_schema(self, value: Any, schema: Any) -> bool | None:
        """Whether a parsed JSON `value` matches `schema`; None when it cannot be judged
        within the bounds above (the steps are shared with every other check of this checker)."""
        if self._steps_left <= 0 or not isinstance(schema, dict):
            return None
        self._root = schema
        dialect = schema.get("$schema")
        self._before_2020 = isinstance(dialect, str) and ("draft-0" in dialect or "2019" in dialect)
        try:
            return self._fits(value, schema)
        except (_Unjudged, RecursionError):
            return None

    def _step(self, count: int = 1) -> None:
        self._steps_left -= count
        if self._steps_left < 0:
            raise _Unjudged

    def _fits(self, value: Any, schema: Any, local: bool = True) -> bool:
        """`local`: references resolve from the root (no `$id` on the way down changed the
        base they resolve from)."""
        self._step()
        if schema is True or schema is False:
            return schema
        if not isinstance(schema, dict):
            return True  # not a schema: nothing checked
        if schema is not self._root and "$id" in schema:
            local = False
        if schema.get("nullable") is True and value is None:
            return True  # OpenAPI's spelling of "or null", as some clients send it
        if "$ref" in schema:
            if not local:
                raise _Unjudged
            if not self._fits(value, self._resolve(schema["$ref"]), local):
                return False
            if self._before_2020 and "draft-0" in str(self._root.get("$schema")):
                return True  # up to draft 7, a $ref's siblings are ignored
        kinds = schema.get("type")
        if kinds is not None:
            names = kinds if isinstance(kinds, list) else [kinds]
            self._step(len(names))
            known = [_TYPES[k] for k in names if isinstance(k, str) and k in _TYPES]
            if len(known) == len(names) and not any(check(value) for check in known):
                return False
        members = schema.get("enum")
        if isinstance(members, list) and not any(self._same(value, m) for m in members):
            return False
        if "const" in schema and not self._same(value, schema["const"]):
            return False
        every = schema.get("allOf")
        for sub in every if isinstance(every, list) else ():
            if not self._fits(value, sub, local):
                return False
        for key in ("anyOf", "oneOf"):  # oneOf read as anyOf: never wrongly "not exactly one"
            options = schema.get(key)
            if (
                isinstance(options, list)
                and options
                and not any(self._fits(value, sub, local) for sub in options)
            ):
                return False
        if isinstance(value, dict):
            return self._fits_object(value, schema, local)
        if isinstance(value, list):
            return self._fits_array(value, schema, local)
        if isinstance(value, str):
            return _within(len(value), schema.get("minLength"), schema.get("maxLength"))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _fits_number(value, schema)
        return True

    def _fits_object(self, value: dict[str, Any], schema: dict[str, Any], local: bool) -> bool:
        required = schema.get("required")
        if isinstance(required, list):
            self._step(len(required))
        if isinstance(required, list) and any(
            isinstance(key, str) and key not in value for key in required
        ):
            return False
        if not _within(len(value), schema.get("minProperties"), schema.get("maxProperties")):
            return False
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        for key, item in value.items():
            if key in properties:
                if not self._fits(item, properties[key], local):
                    return False
            elif "patternProperties" not in schema:  # may have admitted it: not checked
                extra = schema.get("additionalProperties", True)
                if not self._fits(item, extra, local):
                    return False
        return True

    def _fits_array(self, value: list[Any], schema: dict[str, Any], local: bool) -> bool:
        if not _within(len(value), schema.get("minItems"), schema.get("maxItems")):
            return False
        prefix = None if self._before_2020 else schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 7's tuple form
            prefix, items = items, schema.get("additionalItems")
        prefix = prefix if isinstance(prefix, list) else []
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else items
            if sub is not None and not self._fits(item, sub, local):
                return False
        return True

    def _same(self, value: Any, expected: Any) -> bool:
        """JSON equality (1 == 1.0, but true is not 1), each node compared one step: an
        enum of large objects costs what it compares."""
        self._step()
        if isinstance(value, bool) or isinstance(expected, bool):
            return type(value) is type(expected) and value == expected
        if isinstance(value, dict) and isinstance(expected, dict):
            return value.keys() == expected.keys() and all(
                self._same(value[key], expected[key]) for key in value
            )
        if isinstance(value, list) and isinstance(expected, list):
            return len(value) == len(expected) and all(map(self._same, value, expected))
        if isinstance(value, dict | list) or isinstance(expected, dict | list):
            return False
        return bool(value == expected)

    def _resolve(self, ref: Any) -> Any:
        """A JSON pointer inside the schema ("#", "#/$defs/x", "#/definitions/x", ...); anything
        else (another document, never fetched; an anchor) is unjudged. Its length is steps."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _Unjudged
        parts = ref[1:].split("/")[1:]
        self._step(len(parts) + len(ref) // 256)
        node: Any = self._root
        for part in parts:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and _index(key) < len(node):
                node = node[_index(key)]
            else:
                raise _Unjudged
        return node


def _int(text: str) -> int:
    if len(text) > 4000:  # Python's int-from-text limit is 4300 digits: valid JSON all the same
        raise _Unjudged
    return int(text)


def _index(key: str) -> int:
    """A JSON pointer's array index; past any list when it is none ("01", "²", 5000 digits)."""
    if key.isascii() and key.isdigit() and len(key) < 19 and (key == "0" or key[0] != "0"):
        return int(key)
    return 1 << 62


def _within(size: int, low: Any, high: Any) -> bool:
    if _is_number(low) and size < low:
        return False
    return not (_is_number(high) and size > high)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fits_number(value: float, schema: dict[str, Any]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Unjudged  # 1e400: valid JSON that Python reads as infinity
    # An int is compared with the bounds exactly (no float conversion: 400 digits overflow).
    bounds = (
        ("minimum", lambda b: value >= b),
        ("maximum", lambda b: value <= b),
        ("exclusiveMinimum", lambda b: value > b),  # draft 4's boolean form is not checked
        ("exclusiveMaximum", lambda b: value < b),
    )
    for key, holds in bounds:
        bound = schema.get(key)
        if _is_number(bound) and not holds(bound):
            return False
    return True
