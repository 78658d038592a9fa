"""Turn a request recorded from a real client into a fixture: the shape stays, the content goes.

Every free text (message text, system prompt, tool and schema descriptions, tool results, thinking)
becomes a short placeholder; ids that identify a machine or a session become fixed fakes; the test's
temporary paths become ``/work/project``. Field names, types, tool names, schemas, ``cache_control``,
``defer_loading``, betas and the order of messages stay exactly as the client sent them.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# Keys whose string values are free text written by a person, the client's authors or the model.
_TEXT_KEYS = frozenset({"text", "description", "content", "thinking", "instructions", "output", "signature"})
_DROP_HEADERS = frozenset({"host", "content-length", "connection", "accept-encoding"})
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FAKE_UUID = "00000000-0000-4000-8000-000000000000"


def _scrub_string(value: str, paths: tuple[str, ...]) -> str:
    for path in paths:
        value = value.replace(path, "/work/project")
    return _UUID.sub(FAKE_UUID, value)


def sanitize_json(value: Any, paths: tuple[str, ...] = (), *, key: str = "") -> Any:
    if isinstance(value, dict):
        out = {k: sanitize_json(v, paths, key=k) for k, v in value.items()}
        if key == "metadata" and isinstance(out.get("user_id"), str):
            out["user_id"] = _fake_user_id(value["user_id"])
        return out
    if isinstance(value, list):
        return [sanitize_json(v, paths, key=key) for v in value]
    if isinstance(value, str):
        if key in _TEXT_KEYS and value:
            return f"<{key} placeholder>"
        return _scrub_string(value, paths)
    return value


def _fake_user_id(user_id: str) -> str:
    """Claude Code's metadata.user_id is a JSON string of device/account/session ids: keep its keys."""
    try:
        ids = orjson.loads(user_id)
    except orjson.JSONDecodeError:
        return "user_placeholder"
    if not isinstance(ids, dict):
        return "user_placeholder"
    fake = {k: ("0" * 64 if k == "device_id" else FAKE_UUID if v else v) for k, v in ids.items()}
    return orjson.dumps(fake).decode()


def sanitize_headers(headers: dict[str, str], paths: tuple[str, ...] = ()) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in _DROP_HEADERS:
            continue
        if low in _SECRET_HEADERS:
            value = "Bearer sk-placeholder" if low == "authorization" else "sk-placeholder"
        out[low] = _scrub_string(value, paths)
    return out


def fixture_of(
    method: str, path: str, query: str, headers: dict[str, str], body: Any, paths: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "method": method,
        "path": path + (f"?{query}" if query else ""),
        "headers": sanitize_headers(headers, paths),
        "body": sanitize_json(body, paths),
    }
