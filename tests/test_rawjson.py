"""A same-format body goes upstream as the client's own bytes when the gateway changes nothing in it or
only adds members, and is always the edited object exactly (gateway/rawjson.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gateway.rawjson
from gateway.clientbody import UNREAD, ClientBody, parse_body
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


BIG = frozenset(("messages", "a"))
reads = st.sampled_from(["whole", "summarised"])


def _read(raw: bytes, how: str) -> ClientBody:
    # As the proxy reads a body: whole (a translated route), or with its big members left unread.
    return parse_body(raw, (lambda model: None) if how == "whole" else (lambda model: (BIG, "openai")))


@pytest.fixture(autouse=True)
def _splice_small_texts_too() -> Iterator[None]:
    # Short texts are encoded whole in production (cheaper); here every text is spliced, so the
    # generated bodies exercise the splice. Module-wide, so hypothesis sees it in every example.
    with mock.patch.object(gateway.rawjson, "SPLICE_MIN_BYTES", 0):
        yield


def _apply(before: dict[str, Any], ops: list[tuple[str, str, Any]]) -> dict[str, Any]:
    after = dict(before)  # shallow, as a passthrough route edits
    for op, key, value in ops:
        if op == "set":
            after[key] = value
        else:
            after.pop(key, None)
    return after


@SETTINGS
@given(objects, encoders, edits, reads)
def test_the_result_is_always_the_edited_object(obj: dict[str, Any], encode: Any, ops: list[Any], how: str) -> None:
    raw = encode(obj)
    body = _read(raw, how)
    assert body.summarised == (how == "summarised")
    # The route edits what it was given (a summarised head); what goes upstream is that edit of the
    # whole object, summaries never.
    out = patched(body, _apply(body.head, ops))
    assert orjson.loads(out) == _apply(orjson.loads(raw), ops)


@SETTINGS
@given(objects, encoders, st.dictionaries(st.sampled_from(["max_tokens", "stream_options", "new"]), values, max_size=3), reads)
def test_added_members_keep_the_clients_bytes(obj: dict[str, Any], encode: Any, added: dict[str, Any], how: str) -> None:
    raw = encode(obj)
    body = _read(raw, how)
    assume(not set(added) & set(body.head))
    out = patched(body, {**body.head, **added})
    assert orjson.loads(out) == {**orjson.loads(raw), **added}
    if how == "whole":
        return  # read whole for a translation: never forwarded as written
    # Everything the client wrote is there, untouched, after the new members.
    opening = raw.index(b"{")
    assert out[: opening + 1] == raw[: opening + 1]
    assert out.endswith(raw[opening + 1 :])


@SETTINGS
@given(objects, encoders, reads)
def test_an_unchanged_body_is_the_clients_bytes(obj: dict[str, Any], encode: Any, how: str) -> None:
    raw = encode(obj)
    body = _read(raw, how)
    after = dict(body.head)
    for key, value in body.head.items():
        if not isinstance(value, list) and key not in body.big:  # (a summary only as itself)
            after[key] = orjson.loads(orjson.dumps(value))  # equal, not the same object: still unchanged
    if how == "summarised":
        assert patched(body, after) is raw
    else:  # read whole for a translation: never forwarded as written
        assert not body.verbatim and orjson.loads(patched(body, after)) == orjson.loads(raw)


def test_a_replaced_member_is_encoded_whole_even_when_a_duplicate_hides_in_the_text() -> None:
    # An upstream reading the first of two max_tokens would overrun the hold: a replaced member is
    # never spliced in place, the parsed (deduplicated) object is encoded.
    raw = b'{"max_tokens":100000,"model":"m","max_tokens":10}'
    body = _read(raw, "whole")
    out = patched(body, {**body.head, "model": "up"})
    assert out == b'{"max_tokens":10,"model":"up"}'


def test_a_key_written_twice_is_read_whole_and_sent_once() -> None:
    # Even unchanged: an upstream reading the first of two max_tokens would overrun the hold made
    # for the last. Never summarised, never forwarded as written.
    raw = b'{"max_tokens":100000,"model":"m","messages":[],"max_tokens":10}'
    body = _read(raw, "summarised")
    assert not body.summarised and body.head["max_tokens"] == 10
    assert patched(body, dict(body.head)) is not raw
    assert orjson.loads(patched(body, dict(body.head))) == {"max_tokens": 10, "model": "m", "messages": []}


def test_a_summary_holds_only_what_validation_reads() -> None:
    raw = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "secret"}, 5, {"role": 3}], "a": "long text", "n": 1}
    )
    body = _read(raw, "summarised")
    assert body.summarised
    assert body.head == {"model": "m", "messages": [{"role": "user"}, None, {"role": None}], "a": UNREAD, "n": 1}
    assert body.whole()["messages"][0]["content"] == "secret"


def test_what_simdjson_refuses_is_read_by_orjson_with_the_same_answers() -> None:
    from gateway import errors as E

    big = b'{"model":"m","messages":[],"x":123456789012345678901234567890}'  # past 64 bits: a float to orjson
    body = _read(big, "summarised")
    assert not body.summarised and body.head["x"] == 1.2345678901234568e29
    for raw, message in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object"), (b'{"a":"\\ud800"}', "not valid JSON")):
        with pytest.raises(E.BadRequest, match=message):
            _read(raw, "summarised")


def _claude_code_body() -> dict[str, Any]:
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "translate" / "claude_code_request_default_model.json"
    body = orjson.loads(fixture.read_bytes())
    return body.get("request", body) if isinstance(body.get("request"), dict) else body


def test_a_claude_code_request_keeps_its_own_bytes_but_for_the_members_rewritten() -> None:
    # What the Anthropic passthrough does to every Claude Code request: the model's upstream name,
    # the cap the hold allows, metadata.user_id replaced by our tag. Claude Code's Task tool has a
    # "model" property of its own (a nested look-alike of the top-level key).
    whole = _claude_code_body()
    assert orjson.dumps(whole).count(b'"model"') >= 2
    for raw in (orjson.dumps(whole), json.dumps(whole, indent=2).encode()):
        body = parse_body(raw, lambda model: (frozenset(("messages", "system", "tools")), "anthropic"))
        assert body.summarised and body.verbatim
        after = {**body.head, "model": "deepseek-v4", "max_tokens": 1000, "metadata": {"user_id": "cp_tag"}}
        out = patched(body, after)
        assert orjson.loads(out) == {**whole, "model": "deepseek-v4", "max_tokens": 1000, "metadata": {"user_id": "cp_tag"}}
        assert abs(len(out) - len(raw)) < 200  # spliced, not re-encoded (the indented text stays indented)
        if raw.startswith(b'{"model"'):
            for name in ("messages", "system", "tools"):
                assert orjson.dumps(whole[name]) in out  # the conversation, byte for byte


def test_nested_look_alikes_before_the_member_are_passed_over() -> None:
    raw = b'{"tools":[{"name":"t","input_schema":{"properties":{"model":{"type":"string"}}}}],"x":{"model":"m"},"model":"m","messages":[]}'
    body = parse_body(raw, lambda model: (frozenset(("messages", "tools")), "anthropic"))
    out = patched(body, {**body.head, "model": "up"})
    assert out == raw.replace(b'"model":"m","messages"', b'"model":"up","messages"')


def test_a_short_text_with_a_member_replaced_is_encoded_whole() -> None:
    raw = b'{"model": "m", "messages": []}'
    body = parse_body(raw, lambda model: (frozenset(("messages",)), "openai"))
    with mock.patch.object(gateway.rawjson, "SPLICE_MIN_BYTES", 8 * 1024):
        assert patched(body, {**body.head, "model": "up"}) == b'{"model":"up","messages":[]}'
        assert patched(body, {**body.head, "max_tokens": 5}) == b'{"max_tokens":5,"model": "m", "messages": []}'


def test_a_key_written_twice_anywhere_the_gateway_reads_is_read_whole() -> None:
    # simdjson reads the first of two keys, orjson and many upstreams the last: an image hidden
    # behind a text block's second "type" must still be in the hold's bound, and the upstream must
    # get the one reading the gateway billed for.
    plan = (frozenset(("messages", "system", "tools")), "anthropic")
    hidden = b'{"type":"text","text":"","type":"image","source":{"type":"url","url":"https://x/a.png"}}'
    cases = [
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[' + hidden + b"]}]}",
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","role":5,"content":"hi"}]}',
        b'{"model":"m","max_tokens":5,"messages":[],"stream_options":{"include_usage":false,"include_usage":true}}',
        b'{"model":"m","max_tokens":5,"messages":[],"metadata":{"a":{"user_id":"x","user_id":"y"}}}',
    ]
    for raw in cases:
        body = parse_body(raw, lambda model: plan)
        assert not body.summarised and not body.verbatim, raw
        assert orjson.loads(patched(body, dict(body.head))) == orjson.loads(raw)  # sent once, as parsed
    from gateway.estimate import estimate_body
    from gateway.tokens import IMAGE_TOKENS_ANTHROPIC

    assert estimate_body(parse_body(cases[0], lambda model: plan), "anthropic").bound >= IMAGE_TOKENS_ANTHROPIC


def test_a_member_set_to_an_equal_value_of_another_type_is_rewritten() -> None:
    # {"include_usage": 1} == {"include_usage": True} in Python; upstreams tell them apart.
    raw = b'{"model":"m","messages":[],"stream_options":{"include_usage":1},"n":1.0}'
    body = parse_body(raw, lambda model: (frozenset(("messages",)), "openai"))
    out = patched(body, {**body.head, "stream_options": {"include_usage": True}, "n": 1})
    assert b'"include_usage":true' in out and b'"n":1' in out and b'"n":1.0' not in out


def test_a_byte_order_mark_is_refused_as_before() -> None:
    from gateway import errors as E

    with pytest.raises(E.BadRequest, match="not valid JSON"):
        parse_body(b'\xef\xbb\xbf{"model":"m","messages":[]}', lambda model: (frozenset(("messages",)), "openai"))
