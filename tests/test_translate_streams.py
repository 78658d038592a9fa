"""Stream translators: event sequences checked by our SSE parser, a strict validator and the SDKs' own
accumulators (anthropic accumulate_event, openai ChatCompletionStreamState, and both SDK clients
reading our bytes over loopback HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import openai
from aiohttp import web
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

from gateway.sse import SSEParser
from gateway.translate import AnthropicToOpenAIStream, OpenAIToAnthropicStream, ToolNameMap
from gateway.translate.names import sanitize_tool_id

FIXTURES = Path(__file__).parent / "fixtures" / "translate"
_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# --- helpers shared with test_translate_property ------------------------------------------------


def parse_anthropic_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    parser = SSEParser()
    events = parser.feed(raw) + parser.close()
    out = []
    for ev in events:
        data = json.loads(ev.data)
        assert ev.event == data["type"], "event: line must match data.type"
        out.append((ev.event, data))
    return out


def validate_anthropic_events(
    events: list[tuple[str, dict[str, Any]]], *, expect_error: bool = False
) -> None:
    """The rules Claude Code and the SDK rely on, strictly (api-formats 4.4)."""
    kinds = [k for k, _ in events if k != "ping"]
    assert kinds[0] == "message_start" and kinds.count("message_start") == 1
    if expect_error:
        assert kinds[-1] == "error" and kinds.count("error") == 1 and "message_stop" not in kinds
    else:
        assert kinds[-1] == "message_stop" and kinds.count("message_stop") == 1
        assert kinds[-2] == "message_delta" and kinds.count("message_delta") == 1
    next_index = 0
    open_block: dict[str, Any] | None = None
    open_index = -1
    deltas: dict[int, list[str]] = {}
    for kind, data in events:
        if kind == "content_block_start":
            assert open_block is None, "a block started before the previous one stopped"
            assert data["index"] == next_index, "block indices must go 0, 1, 2, ... with no gap"
            open_block, open_index = data["content_block"], data["index"]
            deltas[open_index] = []
            next_index += 1
        elif kind == "content_block_delta":
            assert open_block is not None and data["index"] == open_index
            dtype = data["delta"]["type"]
            allowed = {
                "text": {"text_delta"},
                "thinking": {"thinking_delta", "signature_delta"},
                "tool_use": {"input_json_delta"},
            }
            assert dtype in allowed[open_block["type"]], f"{dtype} inside a {open_block['type']} block"
            deltas[open_index].append(dtype)
        elif kind == "content_block_stop":
            assert open_block is not None and data["index"] == open_index
            if open_block["type"] == "tool_use":
                assert "input_json_delta" in deltas[open_index], "tool_use without input_json_delta"
            if open_block["type"] == "thinking":
                assert deltas[open_index][-1] == "signature_delta", (
                    "signature_delta must come just before stop"
                )
            open_block = None
        elif kind in ("message_delta", "message_stop", "error"):
            assert open_block is None, f"{kind} while a block is open"


def accumulate_anthropic(events: list[tuple[str, dict[str, Any]]]) -> Any:
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for kind, data in events:
        if kind in ("ping", "error"):
            continue
        event = _EVENT_ADAPTER.validate_python(data)  # strict: the SDK's own types must accept it
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


def parse_openai_sse(raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    parser = SSEParser()
    frames = parser.feed(raw) + parser.close()
    chunks: list[dict[str, Any]] = []
    done = False
    for frame in frames:
        assert frame.event is None, "OpenAI streams have no event: lines"
        assert not done, "nothing may follow [DONE]"
        if frame.data == b"[DONE]":
            done = True
            continue
        chunks.append(json.loads(frame.data))
    return chunks, done


def accumulate_openai(chunks: list[dict[str, Any]], *, final: bool = True) -> Any:
    """``final=False`` reads the snapshot: get_final_completion() raises on finish_reason length."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        assert "error" not in chunk
        for _ in state.handle_chunk(ChatCompletionChunk.model_validate(chunk)):
            pass
    return state.get_final_completion() if final else state.current_completion_snapshot


def run_o2a(chunks: list[dict[str, Any]], *, names: ToolNameMap | None = None, finish: bool = True) -> bytes:
    stream = OpenAIToAnthropicStream(
        client_model="claude-sonnet-4-5", message_id="msg_gw1", input_tokens=777, names=names
    )
    out = stream.start()
    for chunk in chunks:
        out += stream.feed(chunk)
    if finish:
        out += stream.finish()
    return out


def run_a2o(
    events: list[list[Any]], *, include_usage: bool = True, names: ToolNameMap | None = None
) -> bytes:
    stream = AnthropicToOpenAIStream(
        client_model="gpt-client",
        completion_id="chatcmpl-gw1",
        include_usage=include_usage,
        names=names,
        created=9,
    )
    out = b""
    for kind, data in events:
        out += stream.feed(kind, data)
    return out + stream.finish()


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else [],
        "usage": usage,
    }


# --- OpenAI upstream -> Anthropic client --------------------------------------------------------


def test_o2a_deepseek_fixture_reasoning_text_tool_usage_on_finish_chunk():
    raw = run_o2a(load("deepseek_reasoning_tool_stream.json"))
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    message = accumulate_anthropic(events)
    assert message.model == "claude-sonnet-4-5"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "The user wants the file list."
    assert message.content[1].text == "I'll list the files."
    assert message.content[2].id == "call_00_XyZ" and message.content[2].name == "Bash"
    assert message.content[2].input == {"command": "ls -la"}
    assert message.stop_reason == "tool_use"
    delta = next(d for k, d in events if k == "message_delta")
    assert delta["usage"] == {
        "input_tokens": 176,
        "output_tokens": 42,
        "cache_read_input_tokens": 1024,
        "cache_creation_input_tokens": 0,
    }
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 777 and start["content"] == []


def test_o2a_openai_fixture_holds_message_delta_until_trailing_usage_chunk():
    chunks = load("openai_parallel_tools_stream.json")
    stream = OpenAIToAnthropicStream(client_model="claude-haiku", message_id="msg_2", input_tokens=5)
    raw = stream.start()
    for c in chunks[:-1]:
        raw += stream.feed(c)
    assert b"message_delta" not in raw and not stream.done  # finish seen, usage not yet
    raw += stream.feed(chunks[-1])
    assert stream.done
    assert stream.finish() == b"" and stream.feed(chunks[-1]) == b""
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    message = accumulate_anthropic(events)
    assert [(b.id, b.name, b.input) for b in message.content] == [
        ("call_abc", "get_weather", {"location": "Paris"}),
        ("call_def", "get_time", {"tz": "CET"}),
    ]
    assert message.usage.input_tokens == 16 and message.usage.cache_read_input_tokens == 64
    assert message.usage.output_tokens == 30


def test_o2a_finish_without_usage_emits_held_delta_with_what_is_known():
    raw = run_o2a([chunk({"role": "assistant", "content": "hi"}), chunk({}, "stop")])
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    delta = next(d for k, d in events if k == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["input_tokens"] == 777


def test_o2a_early_usage_or_null_is_not_latched_as_final():
    stream = OpenAIToAnthropicStream(client_model="m", message_id="msg", input_tokens=1)
    raw = stream.start()
    raw += stream.feed(chunk({"content": "a"}, usage={"prompt_tokens": 9, "completion_tokens": 1}))
    raw += stream.feed(chunk({}, "stop"))
    assert not stream.done  # usage seen before the finish is not the final usage
    raw += stream.feed(chunk(choices=False, usage={"prompt_tokens": 9, "completion_tokens": 3}))
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    assert next(d for k, d in events if k == "message_delta")["usage"]["output_tokens"] == 3


def test_o2a_eof_before_finish_closes_blocks_and_sends_error():
    raw = run_o2a(
        [
            chunk({"content": "partial"}),
            chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a"'}}]}),
        ]
    )
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events, expect_error=True)
    assert events[-1][1]["error"]["type"] == "api_error"


def test_o2a_insufficient_system_resource_is_an_overloaded_error_event():
    raw = run_o2a(
        [
            chunk({"content": "x"}),
            chunk({}, "insufficient_system_resource", usage={"prompt_tokens": 1, "completion_tokens": 1}),
        ]
    )
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events, expect_error=True)
    assert events[-1][1]["error"]["type"] == "overloaded_error"


def test_o2a_error_method_and_upstream_error_chunk():
    stream = OpenAIToAnthropicStream(client_model="m", message_id="msg", input_tokens=1)
    raw = (
        stream.start()
        + stream.feed(chunk({"reasoning_content": "hmm"}))
        + stream.error("overloaded_error", "busy")
    )
    validate_anthropic_events(parse_anthropic_sse(raw), expect_error=True)
    assert stream.done and stream.finish() == b"" and stream.start() == b""
    raw = run_o2a([chunk({"content": "x"}), {"error": {"message": "upstream broke", "type": "server_error"}}])
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events, expect_error=True)


def test_o2a_tool_call_sent_whole_in_finish_chunk_still_gets_input_json_delta():
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "Now", "arguments": ""}}
    raw = run_o2a(
        [chunk({"tool_calls": [call]}, "tool_calls", usage={"prompt_tokens": 3, "completion_tokens": 2})]
    )
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    message = accumulate_anthropic(events)
    assert message.content[0].input == {} and message.stop_reason == "tool_use"


def test_o2a_empty_tool_calls_list_and_empty_content_send_nothing():
    raw = run_o2a(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"tool_calls": [], "content": ""}),
            chunk({"content": "ok"}),
            chunk({}, "stop"),
        ]
    )
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    assert [b.type for b in accumulate_anthropic(events).content] == ["text"]


def test_o2a_new_id_on_reused_index_is_a_new_call():
    raw = run_o2a(
        [
            chunk(
                {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"n": 1}'}}]}
            ),
            chunk(
                {"tool_calls": [{"index": 0, "id": "b", "function": {"name": "g", "arguments": '{"n": 2}'}}]}
            ),
            chunk({}, "tool_calls"),
        ]
    )
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    assert [(b.id, b.name, b.input) for b in accumulate_anthropic(events).content] == [
        ("a", "f", {"n": 1}),
        ("b", "g", {"n": 2}),
    ]


def test_o2a_interleaved_parallel_calls_are_buffered_not_mixed():
    frags = [
        {"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x": '}},
        {"index": 1, "id": "b", "function": {"name": "g", "arguments": '{"y": '}},
        {"index": 0, "function": {"arguments": '"one"'}},
        {"index": 1, "function": {"arguments": '"two"'}},
        {"index": 1, "function": {"arguments": "}"}},
        {"index": 0, "function": {"arguments": "}"}},
    ]
    raw = run_o2a([chunk({"tool_calls": [f]}) for f in frags] + [chunk({}, "tool_calls")])
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    assert [(b.id, b.input) for b in accumulate_anthropic(events).content] == [
        ("a", {"x": "one"}),
        ("b", {"y": "two"}),
    ]


def test_o2a_text_after_tool_and_reasoning_after_text_open_new_blocks():
    raw = run_o2a(
        [
            chunk({"reasoning_content": "r1"}),
            chunk({"content": "t1"}),
            chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}]}),
            chunk({"content": "t2"}),
            chunk({"reasoning": "r2"}),  # OpenRouter/vLLM spelling
            chunk({}, "stop", usage={"prompt_tokens": 1, "completion_tokens": 1}),
        ]
    )
    events = parse_anthropic_sse(raw)
    validate_anthropic_events(events)
    message = accumulate_anthropic(events)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "text", "thinking"]
    assert message.stop_reason == "tool_use"  # "stop" after tool calls


def test_o2a_restores_shortened_names_and_sanitizes_ids():
    names = ToolNameMap()
    long_name = "mcp__" + "x" * 80
    short = names.to_upstream(long_name)
    raw = run_o2a(
        [
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "functions.Bash:0", "function": {"name": short, "arguments": "{}"}}
                    ]
                }
            ),
            chunk({}, "tool_calls"),
        ],
        names=names,
    )
    block = accumulate_anthropic(parse_anthropic_sse(raw)).content[0]
    assert block.name == long_name and block.id == sanitize_tool_id("functions.Bash:0")


def test_o2a_every_finish_reason_maps():
    for finish, stop in [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        ("new_thing", "end_turn"),
    ]:
        events = parse_anthropic_sse(run_o2a([chunk({"content": "x"}), chunk({}, finish)]))
        validate_anthropic_events(events)
        assert accumulate_anthropic(events).stop_reason == stop


def test_o2a_start_is_sent_once_and_ping_only_while_open():
    stream = OpenAIToAnthropicStream(client_model="m", message_id="msg", input_tokens=1)
    assert stream.ping() == b""
    first = stream.start()
    assert first.startswith(b"event: message_start\n") and stream.start() == b""
    assert stream.ping() == b'event: ping\ndata: {"type":"ping"}\n\n'


async def _serve(aiohttp_server: Any, path: str, body: bytes) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post(path, handler)
    return await aiohttp_server(app)


async def test_o2a_bytes_read_by_the_anthropic_sdk_over_http(aiohttp_server):
    raw = run_o2a(load("deepseek_reasoning_tool_stream.json"))
    server = await _serve(aiohttp_server, "/v1/messages", raw)
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="k", max_retries=0)
    try:
        async with client.messages.stream(
            model="claude-gateway-test", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            message = await stream.get_final_message()
    finally:
        await client.close()
    assert text == "I'll list the files."
    assert message.content[2].input == {"command": "ls -la"}
    assert message.usage.cache_read_input_tokens == 1024


async def test_o2a_error_event_raises_in_the_anthropic_sdk(aiohttp_server):
    raw = run_o2a([chunk({"content": "partial"})])  # EOF before finish
    server = await _serve(aiohttp_server, "/v1/messages", raw)
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="k", max_retries=0)
    try:
        async with client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            try:
                await stream.get_final_message()
                raised = None
            except anthropic.APIStatusError as exc:
                raised = exc
    finally:
        await client.close()
    assert raised is not None


# --- Anthropic upstream -> OpenAI client --------------------------------------------------------


def test_a2o_fixture_chunks_accumulate_in_openai_stream_state():
    names = ToolNameMap()
    raw = run_a2o(load("anthropic_thinking_text_tools_stream.json"), names=names)
    chunks, done = parse_openai_sse(raw)
    assert done
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 2112,
        "completion_tokens": 89,
        "total_tokens": 2201,
        "prompt_tokens_details": {"cached_tokens": 2000},
    }
    assert all(c["model"] == "gpt-client" and c["id"] == "chatcmpl-gw1" for c in chunks)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
    assert reasoning == "Let me check."
    completion = accumulate_openai(chunks)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking now."
    calls = choice.message.tool_calls
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_01A", "get_weather", {"location": "Paris"}),
        ("toolu_01B", "get_time", {"tz": "CET"}),
    ]
    indices = [
        tc["index"] for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert set(indices) == {0, 1}  # k counts tool_use blocks, not Anthropic block indices (2, 3)


def test_a2o_no_usage_chunk_unless_asked():
    chunks, done = parse_openai_sse(
        run_a2o(load("anthropic_thinking_text_tools_stream.json"), include_usage=False)
    )
    assert done and all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


def test_a2o_restores_shortened_tool_names():
    names = ToolNameMap()
    long_name = "mcp__" + "y" * 80
    short = names.to_upstream(long_name)
    events = [e for e in load("anthropic_thinking_text_tools_stream.json")]
    events[10] = [
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_01A", "name": short, "input": {}},
        },
    ]
    chunks, _ = parse_openai_sse(run_a2o(events, names=names))
    assert accumulate_openai(chunks).choices[0].message.tool_calls[0].function.name == long_name


def test_a2o_every_stop_reason_maps():
    for stop, finish in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ]:
        events = [
            [
                "message_start",
                {
                    "type": "message_start",
                    "message": {"id": "m", "usage": {"input_tokens": 1, "output_tokens": 0}},
                },
            ],
            [
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 2}},
            ],
            ["message_stop", {"type": "message_stop"}],
        ]
        chunks, _ = parse_openai_sse(run_a2o(events))
        assert accumulate_openai(chunks, final=False).choices[0].finish_reason == finish


def test_a2o_upstream_error_event_and_early_eof():
    stream = AnthropicToOpenAIStream(client_model="m", completion_id="c", include_usage=True)
    raw = stream.feed("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 1}}})
    raw += stream.feed(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    raw += stream.feed(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    raw += stream.feed(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "late"}},
    )
    raw += stream.finish()
    chunks, done = parse_openai_sse(raw)
    assert done
    assert chunks[-1] == {
        "error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}
    }
    assert stream.finish() == b""

    stream = AnthropicToOpenAIStream(client_model="m", completion_id="c", include_usage=False)
    raw = stream.feed("message_start", {"type": "message_start", "message": {}}) + stream.finish()
    chunks, done = parse_openai_sse(raw)
    assert done and chunks[-1]["error"]["type"] == "server_error"


async def test_a2o_bytes_read_by_the_openai_sdk_over_http(aiohttp_server):
    raw = run_a2o(load("anthropic_thinking_text_tools_stream.json"))
    server = await _serve(aiohttp_server, "/v1/chat/completions", raw)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-client", messages=[{"role": "user", "content": "x"}], stream=True
        )
        chunks = [c async for c in stream]
    finally:
        await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking now."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 89


async def test_a2o_error_chunk_raises_in_the_openai_sdk(aiohttp_server):
    stream_tr = AnthropicToOpenAIStream(client_model="m", completion_id="c", include_usage=False)
    raw = stream_tr.feed("message_start", {"type": "message_start", "message": {}})
    raw += stream_tr.error("overloaded_error", "Overloaded") + stream_tr.finish()
    server = await _serve(aiohttp_server, "/v1/chat/completions", raw)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    raised = None
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        try:
            async for _ in stream:
                pass
        except openai.APIError as exc:
            raised = exc
    finally:
        await client.close()
    assert raised is not None and "Overloaded" in str(raised)


def test_a2o_tool_input_given_whole_at_block_start_is_sent_once():
    events = [
        ["message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 1}}}],
        [
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
            },
        ],
        [
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'},
            },
        ],
        ["content_block_stop", {"type": "content_block_stop", "index": 0}],
        [
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 2}},
        ],
        ["message_stop", {"type": "message_stop"}],
    ]
    chunks, _ = parse_openai_sse(run_a2o(events))
    assert json.loads(accumulate_openai(chunks).choices[0].message.tool_calls[0].function.arguments) == {
        "a": 1
    }


def test_a2o_message_start_twice_and_events_after_stop_send_nothing():
    stream = AnthropicToOpenAIStream(client_model="m", completion_id="c", include_usage=False)
    start = {"type": "message_start", "message": {}}
    assert stream.feed("message_start", start) != b""
    assert stream.feed("message_start", start) == b""
    assert stream.feed("ping", {"type": "ping"}) == b""
    end = stream.feed("message_stop", {"type": "message_stop"})
    assert end.endswith(b"data: [DONE]\n\n")
    assert (
        stream.feed("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x"}}) == b""
    )
    assert stream.finish() == b""
