"""The OpenAPI page documents every admin route with an example request and response."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.app import create_app
from gateway.settings import Settings


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app(Settings()).openapi()


def has_example(spec: dict[str, Any], schema: dict[str, Any] | None) -> bool:
    if not schema:
        return False
    if "example" in schema or "examples" in schema:  # beside a $ref too (a route's own)
        return True
    if "$ref" in schema:
        return has_example(spec, spec["components"]["schemas"][schema["$ref"].split("/")[-1]])
    if schema.get("type") == "array":
        return has_example(spec, schema.get("items"))
    if any(
        has_example(spec, s) for key in ("anyOf", "allOf", "oneOf") for s in schema.get(key, [])
    ):
        return True
    # A multipart form: documented field by field.
    properties = schema.get("properties", {})
    return bool(properties) and any(has_example(spec, p) for p in properties.values())


def admin_operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in spec["paths"].items()
        if path.startswith("/admin/v1")
        for method, op in ops.items()
    ]


def test_every_admin_route_has_examples_and_a_summary(spec):
    operations = admin_operations(spec)
    assert len(operations) >= 18
    missing = []
    for method, path, op in operations:
        request = op.get("requestBody", {}).get("content", {})
        request_ok = not request or any(
            has_example(spec, c.get("schema")) for c in request.values()
        )
        success = next(v for k, v in op["responses"].items() if k.startswith("2"))
        body = success.get("content", {}).get("application/json", {})
        response_ok = has_example(spec, body.get("schema"))
        if not (request_ok and response_ok and op.get("description")):
            missing.append((method, path, request_ok, response_ok))
    assert not missing, missing
