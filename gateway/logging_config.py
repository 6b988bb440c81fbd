"""Log setup for the CLI: plain text by default, one JSON object per line when configured."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import unquote

from registry.tenancy import key_id_for

# /admin/v1/keys/{key_id}[/revoke]: where an operator may paste a whole key instead of its id.
# An operator-chosen key (LORAPLEX_IMPORT_API_KEY, LORAPLEX_DEMO_API_KEY) may hold "/" (never
# "?" or "#"): all of what lies between the prefix and a trailing /revoke or the query is taken.
_KEY_IN_PATH = re.compile(r"(/admin/v1/keys/)([^?#]+?)(/revoke)?(?=[?#]|$)")


# Only ever inside a JSON string, where the escape means the same character.
_UNICODE_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            payload["audit"] = audit
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        # JSON leaves these unescaped, yet some log readers end a line at each of them.
        return json.dumps(payload, ensure_ascii=False).translate(_UNICODE_LINE_BREAKS)


def redact_key_paths(path: str) -> str:
    """`path` with any whole API key in a key-id position replaced by its id (or by
    `<redacted>` when it is neither an id nor a key)."""
    return _KEY_IN_PATH.sub(
        lambda m: m[1] + (key_id_for(unquote(m[2])) or "<redacted>") + (m[3] or ""), path
    )


class RedactKeyPaths(logging.Filter):
    """uvicorn's access log writes every request path: a key pasted where its id goes
    (`POST /admin/v1/keys/<key>/revoke`) would land in the logs in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access: (client, method, path, http version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], redact_key_paths(args[2]), *args[3:])
        return True


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn configures this logger's handlers later but keeps its filters.
    logging.getLogger("uvicorn.access").addFilter(RedactKeyPaths())
