"""Typed errors and the one handler set that turns every failure into OpenAI's error shape.

Body: {"error": {"message", "type", "param", "code"}}. FastAPI's {"detail": ...} never leaks;
5xx bodies carry the request id and the traceback goes to the log only.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry import errors as registry_errors
from registry.db import is_contention, is_unreachable

logger = logging.getLogger(__name__)


class LoraplexError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(LoraplexError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(LoraplexError):
    """Unknown, foreign or retired model: one indistinguishable answer, so names can't be probed."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class ModelUnavailable(LoraplexError):
    """A model the caller may use whose traffic is routed, for now, to one it may not: its
    stable fell back to the base model and the caller's policy forbids the base. Neither the
    base nor the version that was rolled back is served in its place."""

    status_code = 503
    error_type = "service_unavailable"
    code = "model_unavailable"

    def __init__(self, model: str):
        super().__init__(
            f"The model `{model}` is unavailable to this key for now: its traffic is rolled "
            "back to the base model, which this key may not use.",
            param="model",
        )


class EngineUnavailable(LoraplexError):
    status_code = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "5"}


class RegistryUnavailable(LoraplexError):
    """The registry database cannot be reached (or did not answer in time) and nothing cached
    can answer instead: the request may succeed when retried."""

    status_code = 503
    error_type = "service_unavailable"
    code = "registry_unavailable"

    def __init__(self) -> None:
        super().__init__("The adapter registry is unreachable; retry shortly.")

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "5"}


class RegistryBusy(LoraplexError):
    """A registry statement gave up waiting on other transactions (a lock past its timeout, a
    deadlock, SQLite's busy timeout): the server answers, and a retry may well succeed."""

    status_code = 503
    error_type = "service_unavailable"
    code = "registry_busy"

    def __init__(self) -> None:
        super().__init__("The adapter registry is busy with other changes; retry shortly.")

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"}


# Registry refusals → HTTP status; the registry itself knows nothing about HTTP.
REGISTRY_STATUS: tuple[tuple[type[registry_errors.RegistryError], int], ...] = (
    (registry_errors.AdapterRejected, 422),
    (registry_errors.InvalidInput, 422),
    (registry_errors.UploadTooLarge, 413),
    (registry_errors.NotFound, 404),
    (registry_errors.Duplicate, 409),
    (registry_errors.RegistryConflict, 409),
    (registry_errors.InvalidStateTransition, 409),
    (registry_errors.RollbackRefused, 409),  # the stable keeps serving: choose another target
    (registry_errors.BaseModelMismatch, 409),
    (registry_errors.ArtifactError, 409),
    (registry_errors.RegistryError, 400),
)


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def typed_error_body(exc: LoraplexError, request_id: str) -> dict[str, Any]:
    """A typed error's body, as a response or a mid-stream SSE event alike: a 5xx names the
    request id so that the operator can find the log lines the client's report is about."""
    message = exc.message
    if exc.status_code >= 500:
        message = f"{message} (request id {request_id})"
    body = error_body(message, exc.error_type, param=exc.param, code=exc.code)
    problems: list[tuple[str, str]] | None = getattr(exc, "problems", None)
    if problems:  # every reason a request was refused, as the registry's refusals list them
        body["error"]["problems"] = [{"code": code, "message": text} for code, text in problems]
    return body


def unexpected_error_body(request_id: str) -> dict[str, Any]:
    """For an exception nobody typed: no detail of it leaves the server."""
    return error_body(
        f"The server had an error while processing your request (request id {request_id}).",
        "server_error",
    )


# Pydantic names the branch of a union each error came from in its location ("prompt",
# "list[int]", 0): the type's name ("str", "list[TextPart]", a model's class name), not a field.
_UNION_BRANCH = re.compile(r"(str|int|float|bool|bytes|none|[A-Z]\w*|[\w-]+\[.*\])")


def _location(loc: tuple[Any, ...]) -> str:
    """An error's location as OpenAI's `param`: the field path, e.g. "messages.0.content"."""
    return ".".join(
        str(part)
        for part in loc
        if part not in ("body", "query")
        and not (isinstance(part, str) and _UNION_BRANCH.fullmatch(part))
    )


def _validation_param(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        # Its location is the character position in the body, not a field.
        reason = (first.get("ctx") or {}).get("error")
        detail = f": {reason}" if reason else ""
        return f"The request body is not valid JSON{detail}.", None
    param = _location(tuple(first.get("loc", ()))) or None
    messages = dict.fromkeys(  # each union branch's error, once per field
        f"{_location(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors
    )
    return "; ".join(messages), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def _loraplex(request: Request, exc: LoraplexError) -> JSONResponse:
        return JSONResponse(
            typed_error_body(exc, request_id_of(request)),
            status_code=exc.status_code,
            headers=exc.headers(),
        )

    @app.exception_handler(registry_errors.RegistryError)
    async def _registry(request: Request, exc: registry_errors.RegistryError) -> JSONResponse:
        status = next(code for kind, code in REGISTRY_STATUS if isinstance(exc, kind))
        body = error_body(exc.message, "invalid_request_error", code=exc.code)
        problems = getattr(exc, "problems", None)
        if problems is not None:
            body["error"]["problems"] = [
                {"code": exc.code, "message": p}
                if isinstance(p, str)
                else {"code": p.code, "message": p.message}
                for p in problems
            ]
        return JSONResponse(body, status_code=status)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if is_contention(exc):  # before is_unreachable, which takes SQLite's busy for one
            busy = RegistryBusy()
            logger.warning(
                "registry busy in request %s: %r", request_id_of(request), getattr(exc, "orig", exc)
            )
            return JSONResponse(
                typed_error_body(busy, request_id_of(request)),
                status_code=busy.status_code,
                headers=busy.headers(),
            )
        if not is_unreachable(exc):
            return await _unexpected(request, exc)
        # Routes without a cache to fall back on (admin, /v1/models): the client retries.
        # The cause only: the statement's parameters (key ids, names) stay out of the log.
        cause = getattr(exc, "orig", None) or type(exc).__name__
        logger.warning("registry unreachable in request %s: %r", request_id_of(request), cause)
        unavailable = RegistryUnavailable()
        return JSONResponse(
            typed_error_body(unavailable, request_id_of(request)),
            status_code=unavailable.status_code,
            headers=unavailable.headers(),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_param(exc)
        return JSONResponse(
            error_body(message, "invalid_request_error", param=param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(str(exc.detail), error_type, code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.exception("unhandled error in request %s", request_id)
        return JSONResponse(unexpected_error_body(request_id), status_code=500)
