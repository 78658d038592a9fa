"""The passthrough relay finds the events that matter for billing (usage, errors, the end) without
splitting the rest of the stream into events: whatever the text and however the bytes are cut, it
finds exactly the events a full parse would (gateway.relay.BillingEvents)."""

from __future__ import annotations

import json

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.relay import BillingEvents, _carries_billing
from gateway.sse import DONE, SSEParser

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that looks like the marks: the model may well write "usage", "error" or [DONE] itself.
texts = st.text(alphabet=st.sampled_from(list('ab "usage":{}error[DONE]message_\\\n\r:')), max_size=40)
openai_events = st.one_of(
    texts.map(lambda t: (None, {"choices": [{"index": 0, "delta": {"content": t}}], "usage": None})),
    texts.map(lambda t: (None, {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})),
    st.just((None, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})),
    st.just((None, {"error": {"message": "overloaded"}})),
    st.just((None, "[DONE]")),
)
anthropic_events = st.one_of(
    texts.map(lambda t: ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}})),
    st.just(("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}})),
    st.just(("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7}})),
    st.just(("message_stop", {"type": "message_stop"})),
    st.just(("ping", {"type": "ping"})),
    st.just(("error", {"type": "error", "error": {"type": "overloaded_error"}})),
    texts.map(lambda t: (None, {"type": "content_block_delta", "delta": {"text": t}})),  # no event: line
)


def _frame(event: str | None, data: object, newline: bytes, spaced: bool) -> bytes:
    # Upstreams write compact JSON (orjson, Go) or spaced (Python's json.dumps).
    payload = b"[DONE]" if data == "[DONE]" else json.dumps(data).encode() if spaced else orjson.dumps(data)
    head = b"event: " + event.encode() + newline if event else b""
    comment = b": keep-alive" + newline + newline if event == "ping" else b""
    return comment + head + b"data: " + payload + newline + newline


@SETTINGS
@given(
    st.one_of(
        st.tuples(st.just(True), st.lists(openai_events, max_size=12)),
        st.tuples(st.just(False), st.lists(anthropic_events, max_size=12)),
    ),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(1, 60), max_size=30),
    st.booleans(),
)
def test_billing_events_are_found_whatever_the_text_and_the_cuts(
    case: tuple[bool, list], newline: bytes, cuts: list[int], spaced: bool
) -> None:
    openai, events = case
    stream = b"".join(_frame(event, data, newline, spaced) for event, data in events)
    full = SSEParser()
    expected = [
        (ev.event, ev.data)
        for ev in full.feed(stream) + full.close()  # close(): the end of the stream
        if ev.data == DONE or _carries_billing(openai, ev.event, ev.data)
    ]
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(stream[pos : pos + cut])
        pos += cut
    pieces.append(stream[pos:])
    billing = BillingEvents(openai)
    found = [(ev.event, ev.data) for piece in pieces if piece for ev in billing.feed(piece)]
    found += [(ev.event, ev.data) for ev in billing.close()]  # the end of the stream
    assert found == expected
    # And the parser itself reads the same events however the bytes are cut (a CRLF cut in two
    # once lost an event's name).
    parser = SSEParser()
    whole = SSEParser()
    assert [ev for piece in pieces for ev in parser.feed(piece)] + parser.close() == whole.feed(stream) + whole.close()
