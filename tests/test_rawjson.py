"""A same-format body goes upstream as the client's own bytes when the gateway changes nothing in it or
only adds members, and is always the edited object exactly (gateway/rawjson.py)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.rawjson import patched

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

keys = st.sampled_from(["model", "max_tokens", "stream", "stream_options", "metadata", "messages", "a", "é", 'q"k'])
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=10,
)
objects = st.dictionaries(keys, values, max_size=6)
# How clients write JSON: compact (JavaScript, orjson), Python's default separators, pretty, ASCII-only.
encoders = st.sampled_from(
    [
        orjson.dumps,
        lambda o: json.dumps(o).encode(),
        lambda o: json.dumps(o, indent=2, ensure_ascii=False).encode(),
        lambda o: b"  \n" + json.dumps(o, separators=(",", ":")).encode() + b"\n",
    ]
)
edits = st.lists(
    st.tuples(st.sampled_from(["set", "drop"]), keys, values),
    max_size=4,
)


def _apply(before: dict[str, Any], ops: list[tuple[str, str, Any]]) -> dict[str, Any]:
    after = dict(before)  # shallow, as a passthrough route edits
    for op, key, value in ops:
        if op == "set":
            after[key] = value
        else:
            after.pop(key, None)
    return after


@SETTINGS
@given(objects, encoders, edits)
def test_the_result_is_always_the_edited_object(obj: dict[str, Any], encode: Any, ops: list[Any]) -> None:
    raw = encode(obj)
    before = orjson.loads(raw)
    after = _apply(before, ops)
    assert orjson.loads(patched(raw, before, after)) == after


@SETTINGS
@given(objects, encoders, st.dictionaries(st.sampled_from(["max_tokens", "stream_options", "new"]), values, max_size=3))
def test_added_members_keep_the_clients_bytes(obj: dict[str, Any], encode: Any, added: dict[str, Any]) -> None:
    raw = encode(obj)
    before = orjson.loads(raw)
    assume(not set(added) & set(before))
    after = {**before, **added}
    out = patched(raw, before, after)
    assert orjson.loads(out) == after
    # Everything the client wrote is there, untouched, after the new members.
    opening = raw.index(b"{")
    assert out[: opening + 1] == raw[: opening + 1]
    assert out.endswith(raw[opening + 1 :])


@SETTINGS
@given(objects, encoders)
def test_an_unchanged_body_is_the_clients_bytes(obj: dict[str, Any], encode: Any) -> None:
    raw = encode(obj)
    before = orjson.loads(raw)
    after = dict(before)
    for key, value in before.items():
        if not isinstance(value, list):
            after[key] = orjson.loads(orjson.dumps(value))  # equal, not the same object: still unchanged
    assert patched(raw, before, after) is raw


def test_a_replaced_member_is_encoded_whole_even_when_a_duplicate_hides_in_the_text() -> None:
    # An upstream reading the first of two max_tokens would overrun the hold: a replaced member is
    # never spliced in place, the parsed (deduplicated) object is encoded.
    raw = b'{"max_tokens":100000,"model":"m","max_tokens":10}'
    before = orjson.loads(raw)
    out = patched(raw, before, {**before, "model": "up"})
    assert out == b'{"max_tokens":10,"model":"up"}'
