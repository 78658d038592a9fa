"""A client's JSON body forwarded as its own bytes, with only the top-level members the route changed
rewritten.

Re-encoding an agent's ~400 KB body costs about half of parsing it, and a summarised body
(gateway.clientbody) was never parsed into Python at all. A same-format request usually changes a
few small members (``model`` to the upstream's name, ``max_tokens`` to what the hold allows, Claude
Code's ``metadata.user_id``), so ``patched`` splices new bytes for those into the client's text and
keeps everything else byte for byte.

It never guesses. It works only on a text whose top-level keys are known to appear once each
(``ClientBody.verbatim``). A member is located by its key's string token followed by ``:``, and such
an occurrence is proven to be the top-level one, not one nested in a tool schema or a message: the
text before it closed with ``"":0}`` (or the text after its value opened with ``{``; whichever is
shorter) must parse as an object. An added member goes right after the opening brace (absent from
the parsed object, it is absent from the text: a key written with escapes is that key once parsed).
Anything else (a key written with escapes, a value longer than MAX_VALUE_BYTES, more than a few
nested look-alikes) falls back to encoding the edited whole object.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import simdjson

from .clientbody import ClientBody

__all__ = ["MAX_VALUE_BYTES", "SPLICE_MIN_BYTES", "patched"]

_WS = b" \t\r\n"
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_STRUCTURE = re.compile(rb'["\[\]{}]')
_LITERALS = {ord("t"): 4, ord("f"): 5, ord("n"): 4}
# The members a route rewrites are small; a longer value is not delimited by hand.
MAX_VALUE_BYTES = 4096
# Nested look-alikes of a key tried before giving up (each costs a parse of part of the text).
_MAX_CANDIDATES = 8
# Below this a text with a member replaced or removed is parsed and encoded whole: cheaper than
# proving where the member is. (The proxy summarises only bodies of clientbody.WHOLE_BELOW_BYTES
# and more, so its verbatim bodies are always spliced.)
SPLICE_MIN_BYTES = 8 * 1024


class _Fallback(Exception):
    pass


def patched(body: ClientBody, after: dict[str, Any]) -> bytes:
    """``after`` as JSON bytes, where ``after`` is a shallow edit of ``body.head`` (members added,
    replaced or removed; nested values never changed in place)."""
    before, big = body.head, body.big
    # A summarised member stands for its value without being it: only the same object is unchanged.
    replaced = [
        k for k, v in after.items() if k in before and (v is not before[k] if k in big else not _same(v, before[k]))
    ]
    removed = [k for k in before if k not in after]
    added = [k for k in after if k not in before]
    if not replaced and not removed and not added and body.verbatim:
        return body.raw
    if body.verbatim and ((not replaced and not removed) or len(body.raw) >= SPLICE_MIN_BYTES):
        try:
            return _splice(body, after, replaced, removed, added)
        except _Fallback:
            pass
    return orjson.dumps(_on_whole(body, after))


def _on_whole(body: ClientBody, after: dict[str, Any]) -> dict[str, Any]:
    """The edit of ``body.head`` into ``after``, made on the whole object (a summarised head stands
    for its big members only as summaries, which must never go upstream)."""
    if not body.summarised:
        return after
    before = body.head
    whole = dict(body.whole())
    for key in before:
        if key not in after:
            del whole[key]
    for key, value in after.items():
        if key not in before or value is not before[key]:
            whole[key] = value
    return whole


def _same(a: Any, b: Any) -> bool:
    """Whether a member the route set is, byte for byte once encoded, what the client sent: types
    count (``1`` is not ``true``, ``1.0`` is not ``1``), so an upstream gets exactly what was billed."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, list):
        return False  # a replaced list (messages, tools) is a real change: not compared item by item
    if isinstance(a, dict):
        return orjson.dumps(a) == orjson.dumps(b)
    return bool(a == b)


def _splice(body: ClientBody, after: dict[str, Any], replaced: list[str], removed: list[str], added: list[str]) -> bytes:
    raw = body.raw
    end = len(raw.rstrip(_WS)) if raw[-1:] in (b" ", b"\t", b"\r", b"\n") else len(raw)
    edits: list[tuple[int, int, bytes]] = []  # (start, stop, replacement), non-overlapping
    for key in replaced:
        start, stop = _find_member(body, key, end)
        edits.append((start, stop, orjson.dumps(key) + b":" + orjson.dumps(after[key])))
    for key in removed:
        start, stop = _find_member(body, key, end)
        edits.append(_with_comma(raw, start, stop))
    if added:
        opening = _skip_ws(raw, 0)
        if raw[opening : opening + 1] != b"{":
            raise _Fallback
        members = b",".join(orjson.dumps(k) + b":" + orjson.dumps(after[k]) for k in added)
        # A comma after the new members unless none of the old ones stays.
        comma = b"," if len(body.head) > len(removed) else b""
        edits.append((opening + 1, opening + 1, members + comma))
    edits.sort()
    out: list[bytes | memoryview] = []
    view = memoryview(raw)
    pos = 0
    for start, stop, replacement in edits:
        if start < pos:
            raise _Fallback  # two edits touching (a removal's comma): not worth the care
        out.append(view[pos:start])
        out.append(replacement)
        pos = stop
    out.append(view[pos:])
    return b"".join(out)


def _find_member(body: ClientBody, key: str, end: int) -> tuple[int, int]:
    """(start, stop) of the top-level member ``key``: searched from the end of the text nearer to it
    (past no big member), each occurrence proven top-level or passed over."""
    raw = body.raw
    keys = list(body.head)
    at_index = keys.index(key)
    big_before = any(k in body.big for k in keys[:at_index])
    big_after = any(k in body.big for k in keys[at_index + 1 :])
    backwards = big_before and not big_after
    token = orjson.dumps(key)
    at = raw.rfind(token) if backwards else raw.find(token)
    for _ in range(_MAX_CANDIDATES):
        if at < 0:
            break
        if not _escaped(raw, at):
            colon = _skip_ws(raw, at + len(token))
            if raw[colon : colon + 1] == b":":
                stop = _value_end(raw, _skip_ws(raw, colon + 1))
                if _top_level(raw, at, stop, end):
                    return at, stop
        at = raw.rfind(token, 0, at) if backwards else raw.find(token, at + 1)
    raise _Fallback


def _skip_ws(raw: bytes, pos: int) -> int:
    n = len(raw)
    while pos < n and raw[pos] in _WS:
        pos += 1
    return pos


def _escaped(raw: bytes, pos: int) -> bool:
    """The quote at ``pos`` follows an odd run of backslashes: it is inside a string."""
    count = 0
    pos -= 1
    while pos >= 0 and raw[pos] == 0x5C:
        count += 1
        pos -= 1
    return count % 2 == 1


def _string_end(raw: bytes, pos: int) -> int:
    """Just past the string whose opening quote is at ``pos``."""
    close = raw.find(b'"', pos + 1)
    while close >= 0 and _escaped(raw, close):
        close = raw.find(b'"', close + 1)
    if close < 0:
        raise _Fallback
    return close + 1


def _value_end(raw: bytes, pos: int) -> int:
    """Just past the JSON value starting at ``pos``, if it is no longer than MAX_VALUE_BYTES."""
    first = raw[pos] if pos < len(raw) else 0
    if first == 0x22:  # "
        end = _string_end(raw, pos)
    elif first in _LITERALS:
        end = pos + _LITERALS[first]
    elif first in (0x7B, 0x5B):  # { [
        depth = 0
        cur = pos
        while True:
            found = _STRUCTURE.search(raw, cur, pos + MAX_VALUE_BYTES)
            if found is None:
                raise _Fallback
            at = found.start()
            if raw[at] == 0x22:
                cur = _string_end(raw, at)
                continue
            depth += 1 if raw[at] in (0x7B, 0x5B) else -1
            cur = at + 1
            if depth == 0:
                end = cur
                break
    else:
        number = _NUMBER.match(raw, pos)
        if number is None:
            raise _Fallback
        end = number.end()
    if end - pos > MAX_VALUE_BYTES:
        raise _Fallback
    return end


def _top_level(raw: bytes, start: int, stop: int, end: int) -> bool:
    """Whether the member at raw[start:stop] is one of the top-level object's, proven by parsing the
    shorter side: the text before it closed with ``"":0}``, or the text after it opened with ``{``."""
    try:
        if start <= end - stop:
            return isinstance(simdjson.Parser().parse(raw[:start] + b'"":0}'), simdjson.Object)
        after = _skip_ws(raw, stop)
        if raw[after : after + 1] == b"}":
            return after + 1 == end
        if raw[after : after + 1] == b",":
            return isinstance(simdjson.Parser().parse(b"{" + raw[after + 1 :]), simdjson.Object)
        return False
    except (ValueError, RuntimeError):
        return False


def _with_comma(raw: bytes, start: int, stop: int) -> tuple[int, int, bytes]:
    """The span removing a member and one comma beside it."""
    after = _skip_ws(raw, stop)
    if raw[after : after + 1] == b",":
        return start, after + 1, b""
    before = start - 1
    while before >= 0 and raw[before] in _WS:
        before -= 1
    if before >= 0 and raw[before] == 0x2C:  # the last member: drop the comma before it
        return before, stop, b""
    return start, stop, b""  # the only member
