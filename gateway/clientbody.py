"""A client's JSON request: its own bytes, the members the gateway reads, the whole object only when
something needs it.

A coding agent resends its whole conversation every turn (~400 KB at 100k tokens). When the request
goes upstream in the client's own format, the proxy needs only the small members (model, caps,
stream flags, metadata), the message roles (to refuse a malformed request itself) and its images and
documents (for the hold's bound); the conversation itself goes on as the client wrote it. simdjson
reads the text into its own tape at a third of orjson's cost for building Python objects from it, so
such a request is *summarised*: small members as Python values, the big ones (``big_members`` of the
client format: messages, tools, system) only as what validation reads. The whole object is parsed
from the bytes only when something needs it: an exact token count (a hold the bound does not fit,
the no-usage fallback) or a member the route replaces (see ``gateway.rawjson``).

A short text (under ``WHOLE_BELOW_BYTES``, as the proxy calls it) is parsed whole by orjson and
encoded whole when it goes upstream: cheaper than summarising it. A translated route gets the whole
object (simdjson builds a large one faster than orjson). A body simdjson
refuses (orjson may not: an integer past 64 bits) or with a top-level key written twice is parsed
whole by orjson, with the same 400s as ever, and is never forwarded as written (``verbatim``): an
upstream reading the first of two ``max_tokens`` would overrun a hold made for the last. A simdjson
document is read completely before this module returns: none of its objects outlives the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import simdjson

from . import tokens
from .jsonbody import json_object

__all__ = ["UNREAD", "WHOLE_BELOW_BYTES", "ClientBody", "parse_body"]

# Below this a body is parsed whole by orjson (and encoded whole when it goes upstream): for a short
# text that costs less than summarising it with simdjson (a parser each, then Python per object).
WHOLE_BELOW_BYTES = 16 * 1024


class _Unread:
    """Stands in a summarised head for a big member other than the messages: never its value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unread>"


UNREAD = _Unread()


class ClientBody:
    """One request's body. ``head`` is the whole object, or (``summarised``) every member with the big
    ones summarised: ``messages`` as its roles (for validation), the others as ``UNREAD``. A summary
    is never forwarded, never translated."""

    __slots__ = ("_whole", "big", "fixed_tokens", "head", "raw", "summarised", "verbatim")

    def __init__(
        self,
        raw: bytes,
        head: dict[str, Any],
        *,
        summarised: bool = False,
        fixed_tokens: int = 0,
        verbatim: bool = False,
        big: frozenset[str] = frozenset(),
    ) -> None:
        self.raw = raw
        self.head = head  # in the text's order
        self.summarised = summarised
        self.big = big  # the members summarised (the bulk of the text)
        # The text may go upstream as written: each top-level key appears in it once.
        self.verbatim = verbatim
        # Images and documents at their fixed estimates (gateway.tokens), read from the summarised
        # body's big members while they were at hand; 0 for a whole body (its estimate walks it).
        self.fixed_tokens = fixed_tokens
        self._whole: dict[str, Any] | None = None if summarised else head

    def whole(self) -> dict[str, Any]:
        """The whole object (parsed from the bytes the first time a summarised body is asked)."""
        if self._whole is None:
            try:
                whole = orjson.loads(self.raw)
            except orjson.JSONDecodeError:
                # simdjson read this text and orjson does not: simdjson's reading is the one the
                # summary came from (no such text is known; a BOM is refused before summarising).
                doc = simdjson.Parser().parse(self.raw)
                assert isinstance(doc, simdjson.Object)  # the summary came from the same text
                whole = doc.as_dict()
            assert isinstance(whole, dict)
            self._whole = whole
        return self._whole


def parse_body(
    raw: bytes, summarise: Callable[[Any], tuple[frozenset[str], str] | None], *, whole_below: int = 0
) -> ClientBody:
    """``raw`` as a ClientBody. ``summarise`` gets the body's ``model`` member (any JSON value) and
    answers the big members to leave unread and the token-count format of the request ("openai" or
    "anthropic"), or None: parse it whole. A text shorter than ``whole_below`` is parsed whole."""
    if len(raw) < whole_below:
        return ClientBody(raw, json_object(raw))
    try:
        read = _read(raw, summarise)
    except (ValueError, RuntimeError, KeyError):  # simdjson refused (a key with a NUL), a key twice
        read = None
    if read is not None:
        return read
    return ClientBody(raw, json_object(raw))


def _read(raw: bytes, summarise: Callable[[Any], tuple[frozenset[str], str] | None]) -> ClientBody | None:
    if raw.startswith(b"\xef\xbb\xbf"):
        return None  # a byte order mark: simdjson skips it, orjson (and the 400 it gives) does not
    # A parser per request: a simdjson parser refuses a second document while objects of the first
    # are alive, and requests interleave on the loop; allocating one costs ~10 us.
    doc = simdjson.Parser().parse(raw)
    if not isinstance(doc, simdjson.Object):
        return None
    keys = list(doc.keys())
    if len(set(keys)) != len(keys):
        # A key written twice: simdjson reads the first, orjson (and many upstreams) the last. Parsed
        # whole and re-encoded, the upstream sees exactly the one value the gateway billed for.
        return None
    plan = summarise(_value(doc["model"]) if "model" in doc else None)
    if plan is None:
        # Read whole for a translation (re-encoded anyway): its nested objects are not checked for
        # a key written twice, so its text is not one to forward as written.
        return ClientBody(raw, doc.as_dict())
    big, fmt = plan
    # Every object read here must have each key once (tokens.DuplicateKeys otherwise: read whole):
    # simdjson reads the first of two, orjson and many upstreams the last.
    head: dict[str, Any] = {key: UNREAD if key in big else _value(_unique(doc[key])) for key in keys}
    fixed = tokens.fixed_outside_messages(doc, fmt)
    if "messages" in head:
        # One pass over the messages for both (a second walk over a simdjson array costs double).
        head["messages"], in_messages = _roles_and_fixed(doc["messages"], fmt)
        fixed += in_messages
    return ClientBody(raw, head, summarised=True, fixed_tokens=fixed, verbatim=True, big=big & head.keys())


def _unique(value: Any) -> Any:
    """``value`` if no object in it has a key twice (small members only: it walks them)."""
    if isinstance(value, simdjson.Object):
        keys = list(value.keys())
        if len(keys) != len(set(keys)):
            raise tokens.DuplicateKeys
        for key in keys:
            _unique(value[key])  # (values() would convert, losing a nested duplicate)
    elif isinstance(value, simdjson.Array):
        for item in value:
            _unique(item)
    return value


def _value(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _roles_and_fixed(value: Any, fmt: str) -> tuple[Any, int]:
    """What validation reads of the messages (each object as its ``role`` alone, a string or None;
    anything else as None; not an array: None), and their images' and documents' estimates."""
    if not isinstance(value, simdjson.Array):
        # Not an array: validation refuses it whatever it is (a fresh object: never the value).
        return ({} if isinstance(value, simdjson.Object) else _value(value)), 0
    roles: list[Any] = []
    fixed = 0
    for item in value:
        if isinstance(item, simdjson.Object):
            fixed += tokens.fixed_of_message(item, fmt)  # first: it refuses a key written twice
            role = item.get("role")
            roles.append({"role": role if isinstance(role, str) else None})
        else:
            roles.append(None)
    return roles, fixed
