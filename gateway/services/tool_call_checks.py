"""Whether a call the model wrote under tool_choice "auto" is one the client can make: a
function it was given, with arguments that are a JSON object matching that function's
`parameters` (the seed's tool-call success, as far as the gateway can judge it without running
the tool). Counted per version in loraplex_tool_calls_total, and evidence for its rollout: a
fine-tune that writes broken calls shows before any caller's feedback does.

The judge runs on the event loop every stream shares, over a client's schema and a model's
output, so its work is bounded: each check has JUDGE_BUDGET_S (schemas whose `anyOf`/`$ref`
chains explode, or regular expressions that backtrack, end it unjudged); `pattern`s run under
the `regex` module's timeout; `patternProperties` (whose regexes jsonschema runs with Python's
`re` inside other keywords, beyond any timeout) and references outside the schema (never
fetched) leave a call unjudged once its name and JSON-object form pass. Unjudged calls are
neither counted nor evidence.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import regex

Outcome = Literal["valid", "unknown_function", "invalid_arguments", "malformed"]

JUDGE_BUDGET_S = 0.02


class _OverBudget(Exception):
    pass


class CallChecker:
    def __init__(self, tools: list[dict[str, Any]]):
        """`tools`: as chat templates take them ({"type": "function", "function": {...}})."""
        self._parameters = {
            tool["function"]["name"]: tool["function"].get("parameters") for tool in tools
        }
        self._validators: dict[str, Any] = {}
        self._deadline = 0.0

    def outcome(self, name: str, arguments: str) -> Outcome | None:
        """The call's outcome; None when it cannot be judged within the bounds above."""
        if name not in self._parameters:
            return "unknown_function"
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):
            return "invalid_arguments"
        if not isinstance(value, dict):
            return "invalid_arguments"
        schema = self._parameters[name]
        if not schema:
            return "valid"  # no parameters: any object
        try:
            validator = self._validator(name)
            if validator is None:
                return None
            self._deadline = time.perf_counter() + JUDGE_BUDGET_S
            error = next(validator.iter_errors(value), None)
        except Exception:  # over budget, a reference outside the schema, recursion
            return None
        return "valid" if error is None else "invalid_arguments"

    def _validator(self, name: str) -> Any:
        if name not in self._validators:
            self._validators[name] = self._validator_for(self._parameters[name])
        return self._validators[name]

    def _validator_for(self, schema: dict[str, Any]) -> Any:
        import jsonschema
        from referencing import Registry

        if _has_key(schema, "patternProperties"):
            return None
        try:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
        except Exception:  # invalid JSON Schema: the engine was given it as the client sent it
            return None
        keywords = {name: self._timed(check) for name, check in cls.VALIDATORS.items()}
        keywords["pattern"] = self._timed(self._pattern)
        bounded = jsonschema.validators.extend(cls, keywords)
        # An empty registry: a reference outside the schema is unresolvable, never fetched
        # (jsonschema's default retrieves URLs, file:// ones too, without a timeout).
        return bounded(schema, registry=Registry())

    def _timed(self, check: Any) -> Any:
        def timed(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
            if time.perf_counter() > self._deadline:
                raise _OverBudget
            yield from check(validator, value, instance, schema) or ()

        return timed

    def _pattern(self, validator: Any, pattern: Any, instance: Any, schema: Any) -> Any:
        import jsonschema

        if not validator.is_type(instance, "string"):
            return
        left = self._deadline - time.perf_counter()
        if left <= 0:
            raise _OverBudget
        try:
            matched = regex.search(pattern, instance, timeout=left)
        except TimeoutError as exc:
            raise _OverBudget from exc
        if not matched:
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _has_key(node: Any, key: str) -> bool:
    """Whether `key` is a keyword anywhere in the schema (or a name: erring on unjudged)."""
    if isinstance(node, list):
        return any(_has_key(item, key) for item in node)
    if isinstance(node, dict):
        return key in node or any(_has_key(value, key) for value in node.values())
    return False
