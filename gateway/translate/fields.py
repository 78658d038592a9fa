"""Shared checks for request fields: a wrong field is a BadRequest that names it, never shows it."""

from __future__ import annotations

from typing import Any

from gateway.errors import BadRequest

__all__ = ["cap_max_tokens", "need_dict", "need_list", "number"]


def need_list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{field}: must be an array", param=field)
    return value


def need_dict(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{field}: must be an object", param=field)
    return value


def cap_max_tokens(requested: Any, cap: int, field: str) -> int:
    if requested is None:
        return cap
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise BadRequest(f"{field}: must be a positive integer", param=field)
    return min(requested, cap)


def number(body: dict[str, Any], key: str) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key}: must be a number", param=key)
    return value
