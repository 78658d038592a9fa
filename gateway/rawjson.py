"""A client's JSON body forwarded as its own bytes when the gateway changes nothing in it, or only adds
top-level members.

Re-encoding an agent's ~400 KB body costs about half of parsing it. A same-format request often
leaves the gateway unchanged (the model's upstream name is the one the client sent, its
``max_tokens`` fits) or gains members it did not have (``max_tokens``, ``stream_options``): both are
done on the client's bytes. A member that is *replaced* or removed makes the whole edited object be
encoded again: rewriting it in place would mean proving where the top-level member is and that it
is not duplicated (an upstream that reads the first of two ``max_tokens`` would overrun a hold), and
that proof needs a scan of the whole body that costs as much as the encoding (measured).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["patched"]

_WS = b" \t\r\n"


def patched(raw: bytes, before: dict[str, Any], after: dict[str, Any]) -> bytes:
    """``after`` as JSON bytes, where ``before`` is ``orjson.loads(raw)`` and ``after`` a shallow
    edit of it (nested values never changed in place)."""
    if len(after) < len(before) or any(k not in after for k in before):
        return orjson.dumps(after)  # a member removed
    added: list[bytes] = []
    for key, value in after.items():
        if key not in before:
            added.append(orjson.dumps(key) + b":" + orjson.dumps(value))
        elif not _same(value, before[key]):
            return orjson.dumps(after)  # a member replaced
    if not added:
        return raw
    # A member absent from the parsed object is absent from the text (a key written with escapes is
    # still that key once parsed), so adding it right after the opening brace cannot duplicate it.
    opening = 0
    while opening < len(raw) and raw[opening] in _WS:
        opening += 1
    if raw[opening : opening + 1] != b"{":
        return orjson.dumps(after)
    joined = b",".join(added) + (b"," if before else b"")
    return b"".join((raw[: opening + 1], joined, memoryview(raw)[opening + 1 :]))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, list):
        return False  # a replaced list (messages, tools) is a real change: not compared item by item
    return bool(a == b)
