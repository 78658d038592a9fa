"""Chat chunks / Anthropic events -> Responses events, per event type; and non-streamed bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ServiceUnavailable
from gateway.translate.custom_input import InputExtractor, custom_input_from_arguments
from gateway.translate.responses_body import anthropic_to_responses_response, chat_to_responses_response
from gateway.translate.responses_request import responses_to_chat_request
from gateway.translate.responses_stream import ChatToResponsesStream
from gateway.translate.responses_stream_anthropic import AnthropicToResponsesStream
from gateway.translate.responses_tools import ResponsesToolMap
from tests.codex_fixtures import FIRST_TURN, PATCH
from tests.responses_harness import carried, parse_responses_sse, validate_responses_events

FIXTURES = Path(__file__).parent / "fixtures" / "translate"


def codex_tools() -> ResponsesToolMap:
    return responses_to_chat_request(FIRST_TURN, upstream_model="x", max_tokens=100)[1]


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def call(index: int, call_id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        fragment["id"] = call_id
        fragment["type"] = "function"
    if name:
        fragment["function"]["name"] = name
    return {"tool_calls": [fragment]}


USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


def run(
    chunks: list[dict[str, Any]], *, tools: ResponsesToolMap | None = None, finish: bool = True, **kw: Any
) -> list[dict[str, Any]]:
    tr = ChatToResponsesStream(
        response_id="resp_t1", client_model="coding-model", tools=tools, created_at=1700000000, **kw
    )
    raw = tr.start()
    for c in chunks:
        raw += tr.feed(c)
    if finish:
        raw += tr.finish()
        assert tr.done and tr.feed(chunk({"content": "late"})) == b"" and tr.finish() == b""
    return parse_responses_sse(raw)


def test_text_stream_event_by_event():
    events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk(finish="stop", usage=USAGE),
        ]
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = events[0]["response"]
    assert created["id"] == "resp_t1" and created["status"] == "in_progress" and created["output"] == []
    assert (
        created["model"] == "coding-model"
        and created["object"] == "response"
        and created["created_at"] == 1700000000
    )
    added = events[2]
    assert added["item"] == {
        "id": "msg_t1_0",
        "type": "message",
        "status": "in_progress",
        "content": [],
        "role": "assistant",
    }
    assert events[3]["part"] == {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    assert events[4] == {
        "type": "response.output_text.delta",
        "item_id": "msg_t1_0",
        "output_index": 0,
        "content_index": 0,
        "delta": "Hel",
        "logprobs": [],
        "sequence_number": 4,
    }
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello"
    assert done["usage"] == {
        "input_tokens": 100,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 20,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 120,
    }
    validate_responses_events(events)


def test_deepseek_fixture_reasoning_then_tool_call():
    chunks = json.loads((FIXTURES / "deepseek_reasoning_tool_stream.json").read_text())
    events = run(chunks)
    summary = validate_responses_events(events)
    kinds = [i["type"] for i in summary["items"]]
    assert kinds[0] == "reasoning"
    assert "function_call" in kinds
    types = [e["type"] for e in events]
    assert (
        "response.reasoning_summary_part.added" in types and "response.reasoning_summary_text.done" in types
    )
    usage = summary["response"]["usage"]
    final_usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    assert usage["input_tokens"] == final_usage["prompt_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] == final_usage["prompt_cache_hit_tokens"]


def test_openai_fixture_parallel_tools_and_trailing_usage():
    chunks = json.loads((FIXTURES / "openai_parallel_tools_stream.json").read_text())
    events = run(chunks[:-1], finish=False)  # everything but the trailing usage chunk
    assert not any(e["type"] == "response.completed" for e in events)
    events = run(chunks)
    summary = validate_responses_events(events)
    calls = [i for i in summary["items"] if i["type"] == "function_call"]
    assert len(calls) >= 2 and all(json.loads(c["arguments"]) is not None for c in calls)
    assert summary["response"]["usage"]["input_tokens"] == chunks[-1]["usage"]["prompt_tokens"]


def test_reasoning_summary_events():
    events = run(
        [
            chunk({"reasoning_content": "think "}),
            chunk({"reasoning_content": "hard"}),
            chunk({"content": "ok"}),
            chunk(finish="stop", usage=USAGE),
        ]
    )
    rs = [e for e in events if "reasoning" in e["type"] or e.get("item", {}).get("type") == "reasoning"]
    assert [e["type"] for e in rs] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    assert rs[1]["part"] == {"type": "summary_text", "text": ""} and rs[1]["summary_index"] == 0
    assert rs[4]["text"] == "think hard" and rs[4]["item_id"] == "rs_t1_0"
    assert rs[-1]["item"] == {
        "id": "rs_t1_0",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "think hard"}],
    }
    validate_responses_events(events)


def test_usage_details_deepseek_and_openai():
    ds = {
        "prompt_tokens": 50,
        "completion_tokens": 9,
        "prompt_cache_hit_tokens": 40,
        "prompt_cache_miss_tokens": 10,
        "completion_tokens_details": {"reasoning_tokens": 7},
    }
    usage = run([chunk({"content": "x"}), chunk(finish="stop", usage=ds)])[-1]["response"]["usage"]
    assert (
        usage["input_tokens_details"]["cached_tokens"] == 40
        and usage["output_tokens_details"]["reasoning_tokens"] == 7
    )
    oa = {"prompt_tokens": 50, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 32}}
    usage = run([chunk({"content": "x"}), chunk(finish="stop"), {"choices": [], "usage": oa}])[-1][
        "response"
    ]["usage"]
    assert (
        usage["input_tokens"] == 50
        and usage["input_tokens_details"]["cached_tokens"] == 32
        and usage["total_tokens"] == 59
    )


def test_no_usage_ever_reports_the_input_estimate():
    events = run([chunk({"content": "x"}), chunk(finish="stop")], input_tokens=321)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["input_tokens"] == 321


def test_function_call_fragments_and_namespace():
    tools = codex_tools()
    events = run(
        [
            chunk(call(0, "call_a", "mcp__github__get_issue", "")),
            chunk(call(0, args='{"owner":')),
            chunk(call(0, args='"o","repo":"r","number":7}')),
            chunk(finish="tool_calls", usage=USAGE),
        ],
        tools=tools,
    )
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"] == {
        "id": "fc_t1_0",
        "type": "function_call",
        "status": "in_progress",
        "arguments": "",
        "call_id": "call_a",
        "name": "get_issue",
        "namespace": "mcp__github__",
    }
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"owner":', '"o","repo":"r","number":7}']
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == '{"owner":"o","repo":"r","number":7}'
    item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert (
        item["status"] == "completed" and item["namespace"] == "mcp__github__" and item["name"] == "get_issue"
    )
    validate_responses_events(events)


def test_call_without_arguments_gets_an_empty_object():
    events = run(
        [chunk(call(0, "c", "update_plan")), chunk(finish="tool_calls", usage=USAGE)], tools=codex_tools()
    )
    assert [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"] == ["{}"]
    validate_responses_events(events)


def test_custom_tool_input_streams_as_it_decodes():
    args = json.dumps({"input": PATCH + 'caf\u00e9 \U0001f600 "q" \\'})
    pieces = [args[i : i + 3] for i in range(0, len(args), 3)]  # splits escapes mid-way
    events = run(
        [chunk(call(0, "call_p", "apply_patch", pieces[0]))]
        + [chunk(call(0, args=p)) for p in pieces[1:]]
        + [chunk(finish="tool_calls", usage=USAGE)],
        tools=codex_tools(),
    )
    added = next(e for e in events if e["type"] == "response.output_item.added")["item"]
    assert added == {
        "id": "ctc_t1_0",
        "type": "custom_tool_call",
        "call_id": "call_p",
        "name": "apply_patch",
        "input": "",
    }
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 5  # live, not one lump at the end
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert done["input"] == "".join(deltas) == json.loads(args)["input"]
    assert not any(e["type"].startswith("response.function_call") for e in events)
    validate_responses_events(events)


def test_custom_tool_with_unexpected_arguments_falls_back_whole():
    events = run(
        [
            chunk(call(0, "c", "apply_patch", '{"patch": "*** Begin Patch"}')),
            chunk(finish="tool_calls", usage=USAGE),
        ],
        tools=codex_tools(),
    )
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert deltas == ["*** Begin Patch"]
    validate_responses_events(events)


def test_interleaved_parallel_calls_come_out_one_after_another():
    events = run(
        [
            chunk(call(0, "c0", "exec_command", '{"cmd":')),
            chunk(call(1, "c1", "view_image", '{"path":')),
            chunk(call(0, args='"ls"}')),
            chunk(call(1, args='"a.png"}')),
            chunk(finish="tool_calls", usage=USAGE),
        ],
        tools=codex_tools(),
    )
    summary = validate_responses_events(events)
    assert carried(summary["items"])["calls"] == [
        ("c0", None, "exec_command", '{"cmd":"ls"}'),
        ("c1", None, "view_image", '{"path":"a.png"}'),
    ]


def test_length_gives_response_incomplete():
    events = run([chunk({"content": "trunc"}), chunk(finish="length", usage=USAGE)])
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"
    validate_responses_events(events)
    events = run([chunk({"content": "x"}), chunk(finish="content_filter", usage=USAGE)])
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_upstream_error_mid_stream_fails_the_response_without_finishing_open_items():
    events = run(
        [chunk({"content": "par"}), {"error": {"message": "upstream exploded", "type": "server_error"}}]
    )
    assert [e["type"] for e in events][-1] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "server_error",
        "message": "upstream exploded",
    }
    assert failed["output"] == [] and failed["usage"] is None
    assert not any(e["type"] == "response.output_item.done" for e in events)
    validate_responses_events(events)


def test_stream_ending_without_finish_reason_fails():
    events = run([chunk({"content": "par"})])
    assert events[-1]["type"] == "response.failed"
    assert "ended before" in events[-1]["response"]["error"]["message"]


def test_overloaded_finish_and_error_codes_codex_understands():
    events = run([chunk({"content": "x"}), chunk(finish="insufficient_system_resource")])
    assert events[-1]["response"]["error"]["code"] == "server_is_overloaded"
    tr = ChatToResponsesStream(response_id="resp_x", client_model="m")
    raw = tr.start() + tr.error("rate_limit_error", "slow down")
    assert parse_responses_sse(raw)[-1]["response"]["error"]["code"] == "rate_limit_exceeded"


def test_error_before_start_is_a_lone_error_event():
    tr = ChatToResponsesStream(response_id="resp_x", client_model="m")
    events = parse_responses_sse(tr.error("timeout_error", "no answer"))
    assert events == [
        {"type": "error", "code": "server_error", "message": "no answer", "param": None, "sequence_number": 0}
    ]
    assert tr.start() == b"" and tr.done


def test_request_settings_are_echoed():
    events = run([chunk({"content": "x"}), chunk(finish="stop", usage=USAGE)], request=FIRST_TURN)
    for e in (events[0], events[-1]):
        r = e["response"]
        assert r["instructions"] == FIRST_TURN["instructions"] and r["tools"] == FIRST_TURN["tools"]
        assert r["parallel_tool_calls"] is True and r["tool_choice"] == "auto" and r["store"] is False
        assert r["reasoning"] == {"effort": None, "summary": "auto"}
        assert FIRST_TURN["prompt_cache_key"] not in json.dumps(r)


def test_ping_is_a_comment_only_while_live():
    tr = ChatToResponsesStream(response_id="resp_x", client_model="m")
    assert tr.ping() == b""
    tr.start()
    assert tr.ping() == b": keep-alive\n\n"


# --- Anthropic upstream ----------------------------------------------------------------------------


def run_anthropic(events: list[tuple[str, dict[str, Any]]], **kw: Any) -> list[dict[str, Any]]:
    tr = AnthropicToResponsesStream(response_id="resp_a1", client_model="coding-model", created_at=1, **kw)
    raw = tr.start()
    for etype, data in events:
        raw += tr.feed(etype, data)
    raw += tr.finish()
    assert tr.done
    return parse_responses_sse(raw)


def test_anthropic_fixture_thinking_text_tools():
    fixture = json.loads((FIXTURES / "anthropic_thinking_text_tools_stream.json").read_text())
    events = run_anthropic([(e, d) for e, d in fixture])
    summary = validate_responses_events(events)
    kinds = [i["type"] for i in summary["items"]]
    assert kinds[0] == "reasoning" and "message" in kinds and "function_call" in kinds
    start_usage = fixture[0][1]["message"]["usage"]
    usage = summary["response"]["usage"]
    assert (
        usage["input_tokens"]
        == start_usage["input_tokens"]
        + start_usage["cache_read_input_tokens"]
        + start_usage["cache_creation_input_tokens"]
    )
    assert usage["input_tokens_details"] == {"cached_tokens": 2000, "cache_write_tokens": 100}


def test_anthropic_custom_tool_and_max_tokens():
    tools = codex_tools()
    events = run_anthropic(
        [
            (
                "message_start",
                {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "apply_patch",
                        "input": {},
                    },
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": '{"input": "*** Begin'},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": ' Patch"}'},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens"},
                    "usage": {"output_tokens": 9},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ],
        tools=tools,
    )
    summary = validate_responses_events(events)
    assert summary["terminal"] == "response.incomplete"
    assert summary["items"][0]["input"] == "*** Begin Patch" and summary["items"][0]["call_id"] == "toolu_1"
    assert summary["response"]["usage"]["output_tokens"] == 9


def test_anthropic_error_event_fails_the_response():
    events = run_anthropic(
        [
            ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 5}}}),
            ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ]
    )
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_is_overloaded", "message": "Overloaded"}


# --- custom input extraction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"input": "a\\nb"}', "a\nb"),
        ('{"patch": "x"}', "x"),
        ('{"a": "x", "b": "y"}', '{"a": "x", "b": "y"}'),
        ("not json", "not json"),
        ("", ""),
        ('"just a string"', "just a string"),
    ],
)
def test_custom_input_from_arguments(arguments: str, expected: str):
    assert custom_input_from_arguments(arguments) == expected


def test_extractor_handles_whitespace_and_stops_at_the_closing_quote():
    ex = InputExtractor()
    text = "".join(ex.feed(p) for p in ["{ ", '"in', 'put" :  "ab', "\\", 'u00e9c"', ', "x": 1}'])
    assert text == "ab\u00e9c" and ex.started


# --- non-streamed ----------------------------------------------------------------------------------


def test_chat_completion_to_response_object():
    tools = codex_tools()
    resp = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Patching.",
                    "reasoning_content": "need a patch",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "apply_patch", "arguments": json.dumps({"input": PATCH})},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "mcp__github__search_code", "arguments": '{"q":"x"}'},
                        },
                        {
                            "id": "c3",
                            "type": "function",
                            "function": {"name": "update_plan", "arguments": ""},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_cache_hit_tokens": 8,
            "prompt_cache_miss_tokens": 2,
        },
    }
    out = chat_to_responses_response(
        resp,
        response_id="resp_n1",
        client_model="coding-model",
        tools=tools,
        request=FIRST_TURN,
        created_at=5,
    )
    assert (
        out["object"] == "response"
        and out["id"] == "resp_n1"
        and out["status"] == "completed"
        and out["created_at"] == 5
    )
    assert out["output"] == [
        {"id": "rs_n1_0", "type": "reasoning", "summary": [{"type": "summary_text", "text": "need a patch"}]},
        {
            "id": "msg_n1_1",
            "type": "message",
            "status": "completed",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Patching."}],
            "role": "assistant",
        },
        {
            "id": "ctc_n1_2",
            "type": "custom_tool_call",
            "call_id": "c1",
            "name": "apply_patch",
            "input": PATCH,
        },
        {
            "id": "fc_n1_3",
            "type": "function_call",
            "status": "completed",
            "arguments": '{"q":"x"}',
            "call_id": "c2",
            "name": "search_code",
            "namespace": "mcp__github__",
        },
        {
            "id": "fc_n1_4",
            "type": "function_call",
            "status": "completed",
            "arguments": "{}",
            "call_id": "c3",
            "name": "update_plan",
        },
    ]
    assert out["usage"]["input_tokens_details"]["cached_tokens"] == 8 and out["usage"]["total_tokens"] == 15


def test_chat_completion_length_and_overload():
    resp = {"choices": [{"message": {"content": "par"}, "finish_reason": "length"}], "usage": USAGE}
    out = chat_to_responses_response(resp, response_id="resp_n2", client_model="m")
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["status"] == "incomplete"
    with pytest.raises(ServiceUnavailable):
        chat_to_responses_response(
            {"choices": [{"message": {}, "finish_reason": "insufficient_system_resource"}]},
            response_id="resp_x",
            client_model="m",
        )


def test_anthropic_message_to_response_object():
    resp = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Hi."},
            {"type": "tool_use", "id": "toolu_9", "name": "exec_command", "input": {"cmd": "ls"}},
        ],
        "stop_reason": "tool_use",
        "usage": {
            "input_tokens": 3,
            "cache_read_input_tokens": 10,
            "cache_creation_input_tokens": 4,
            "output_tokens": 7,
        },
    }
    out = anthropic_to_responses_response(resp, response_id="resp_a", client_model="m", tools=codex_tools())
    assert [i["type"] for i in out["output"]] == ["reasoning", "message", "function_call"]
    assert out["output"][2]["call_id"] == "toolu_9" and json.loads(out["output"][2]["arguments"]) == {
        "cmd": "ls"
    }
    assert out["usage"] == {
        "input_tokens": 17,
        "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 4},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 24,
    }
