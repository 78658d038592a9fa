"""Property tests: any valid upstream stream, however fragmented, becomes a valid Responses event
stream carrying exactly the same text, reasoning, calls and arguments; and a custom tool's input
survives any fragmentation of its JSON arguments."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.translate.custom_input import InputExtractor, custom_input_from_arguments
from gateway.translate.responses_stream import ChatToResponsesStream
from gateway.translate.responses_stream_anthropic import AnthropicToResponsesStream
from gateway.translate.responses_tools import ResponsesToolMap
from tests.responses_harness import carried, parse_responses_sse, validate_responses_events
from tests.test_translate_property import SETTINGS, anthropic_stream, openai_stream, split


def tool_map() -> ResponsesToolMap:
    """Bash a plain function, Read a custom (freeform) tool, mcp__srv__tool a namespaced function."""
    tools = ResponsesToolMap()
    tools.add("function", "Bash")
    tools.add("custom", "Read")
    tools.add("function", "tool", "mcp__srv__")
    return tools


EXPECTED_IDENTITY = {"Bash": (None, "Bash"), "Read": (None, "Read"), "mcp__srv__tool": ("mcp__srv__", "tool")}


def expected_call(call_id: str, upstream_name: str, args: str) -> tuple[Any, ...]:
    namespace, name = EXPECTED_IDENTITY[upstream_name]
    if upstream_name == "Read":
        return (call_id, namespace, name, {"input": custom_input_from_arguments(args)})
    return (call_id, namespace, name, args)


@SETTINGS
@given(openai_stream())
def test_any_chat_stream_becomes_a_valid_responses_stream_with_the_same_content(case):
    chunks, expected = case
    tr = ChatToResponsesStream(response_id="resp_p", client_model="m", tools=tool_map(), input_tokens=777)
    raw = tr.start() + b"".join(tr.feed(c) for c in chunks) + tr.finish()
    events = parse_responses_sse(raw)
    summary = validate_responses_events(events)
    got = carried(summary["items"])
    assert got["text"] == expected["text"]
    assert got["reasoning"] == expected["reasoning"]
    assert got["calls"] == [expected_call(*t) for t in expected["tools"]]
    terminal = (
        "response.incomplete" if expected["finish"] in ("length", "content_filter") else "response.completed"
    )
    assert summary["terminal"] == terminal
    assert summary["response"]["usage"]["input_tokens"] == (50 if expected["usage_known"] else 777)


@SETTINGS
@given(openai_stream(), st.data())
def test_a_stream_cut_anywhere_ends_with_exactly_one_terminal_event(case, data):
    chunks, _ = case
    cut = data.draw(st.integers(min_value=0, max_value=len(chunks)))
    how = data.draw(st.sampled_from(["eof", "error_chunk", "gateway_error"]))
    tr = ChatToResponsesStream(response_id="resp_c", client_model="m", tools=tool_map())
    raw = tr.start() + b"".join(tr.feed(c) for c in chunks[:cut])
    if how == "error_chunk":
        raw += tr.feed({"error": {"message": "boom"}})
    elif how == "gateway_error":
        raw += tr.error("timeout_error", "stopped")
    raw += tr.finish()
    events = parse_responses_sse(raw)
    summary = validate_responses_events(events)  # one terminal, sequence numbers, contiguous indexes
    if summary["terminal"] == "response.failed":
        done_ids = {e["item"]["id"] for e in events if e["type"] == "response.output_item.done"}
        assert [i["id"] for i in summary["response"]["output"]] == [
            e["item"]["id"] for e in events if e["type"] == "response.output_item.done"
        ]
        assert len(done_ids) == len(summary["response"]["output"])


@SETTINGS
@given(anthropic_stream())
def test_any_anthropic_stream_becomes_a_valid_responses_stream_with_the_same_content(case):
    events, expected = case
    tr = AnthropicToResponsesStream(response_id="resp_a", client_model="m", tools=tool_map())
    raw = tr.start() + b"".join(tr.feed(e, d) for e, d in events) + tr.finish()
    out = parse_responses_sse(raw)
    summary = validate_responses_events(out)
    got = carried(summary["items"])
    assert got["text"] == expected["text"]
    assert got["reasoning"] == expected["reasoning"]
    assert got["calls"] == [(tool_id, None, "Bash", args) for tool_id, args in expected["tools"]]
    usage = summary["response"]["usage"]
    assert usage["input_tokens"] == 12 and usage["input_tokens_details"]["cached_tokens"] == 7
    assert usage["output_tokens"] == 9  # cumulative message_delta usage replaces, never adds


@SETTINGS
@given(st.text(max_size=40), st.booleans(), st.data())
def test_custom_input_survives_any_fragmentation(text, ascii_only, data):
    arguments = json.dumps({"input": text}, ensure_ascii=ascii_only)
    if data.draw(st.booleans()):
        arguments = arguments.replace('{"input": ', '{ "input" :\n ')
    ex = InputExtractor()
    streamed = "".join(ex.feed(p) for p in data.draw(split(arguments)))
    assert ex.started and streamed == text == custom_input_from_arguments(arguments)
