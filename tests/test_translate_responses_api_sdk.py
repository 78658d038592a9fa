"""The official openai SDK's Responses client (stream accumulator, ``create(stream=True)`` and the
non-streamed ``create``) reading the translators' bytes over real HTTP on loopback: what it ends up
with must be exactly what the upstream said."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.translate.responses_body import chat_to_responses_response
from gateway.translate.responses_request import responses_to_chat_request
from gateway.translate.responses_stream import ChatToResponsesStream
from gateway.translate.responses_stream_anthropic import AnthropicToResponsesStream
from tests.codex_fixtures import CODEX_TOOLS, FIRST_TURN, PATCH

USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 77,
    "prompt_cache_hit_tokens": 1000,
    "prompt_cache_miss_tokens": 200,
    "completion_tokens_details": {"reasoning_tokens": 30},
}
EXPECTED_USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 0},
    "output_tokens": 77,
    "output_tokens_details": {"reasoning_tokens": 30},
    "total_tokens": 1277,
}
PATCH_ARGS = json.dumps({"input": PATCH})


def chunk(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }


def frag(index: int, args: str, call_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    f: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        f.update(id=call_id, type="function")
        f["function"]["name"] = name
    return chunk({"tool_calls": [f]})


TEXT_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "The user greets; "}),
    chunk({"reasoning_content": "answer briefly."}),
    chunk({"content": "Hello"}),
    chunk({"content": ", world."}),
    chunk({}, "stop", USAGE),
]
TOOL_STREAM = [
    chunk({"content": "Checking."}),
    frag(0, "", "call_exec", "exec_command"),
    frag(0, '{"cmd":"pytest -q",'),
    frag(0, '"workdir":"/w"}'),
    frag(1, PATCH_ARGS[:20], "call_patch", "apply_patch"),
    *[frag(1, PATCH_ARGS[i : i + 7]) for i in range(20, len(PATCH_ARGS), 7)],
    frag(2, '{"q":"flaky"}', "call_gh", "mcp__github__search_code"),
    chunk({}, "tool_calls"),
    {"object": "chat.completion.chunk", "choices": [], "usage": USAGE},  # OpenAI's trailing usage chunk
]
TOOL_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "run the tests",
                "tool_calls": [
                    {
                        "id": "call_exec",
                        "type": "function",
                        "function": {
                            "name": "exec_command",
                            "arguments": '{"cmd":"pytest -q","workdir":"/w"}',
                        },
                    },
                    {
                        "id": "call_patch",
                        "type": "function",
                        "function": {"name": "apply_patch", "arguments": PATCH_ARGS},
                    },
                    {
                        "id": "call_gh",
                        "type": "function",
                        "function": {"name": "mcp__github__search_code", "arguments": '{"q":"flaky"}'},
                    },
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": USAGE,
}


class Upstream:
    """What the scripted upstream answers next: Chat chunks, Anthropic events or a completion."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.anthropic: list[tuple[str, dict[str, Any]]] | None = None
        self.completion: dict[str, Any] = {}
        self.seen: list[dict[str, Any]] = []


UPSTREAM = web.AppKey("upstream", Upstream)


async def responses_route(request: web.Request) -> web.StreamResponse:
    up = request.app[UPSTREAM]
    body = await request.json()
    up.seen.append(body)
    _, tools = responses_to_chat_request(body, upstream_model="up", max_tokens=4096)
    if not body.get("stream"):
        out = chat_to_responses_response(
            up.completion, response_id="resp_sdk1", client_model=body["model"], tools=tools, request=body
        )
        return web.json_response(out)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    kw: dict[str, Any] = {
        "response_id": "resp_sdk1",
        "client_model": body["model"],
        "tools": tools,
        "request": body,
    }
    if up.anthropic is not None:
        a = AnthropicToResponsesStream(**kw)
        await resp.write(a.start())
        for etype, data in up.anthropic:
            await resp.write(a.feed(etype, data))
        await resp.write(a.finish())
    else:
        c = ChatToResponsesStream(**kw)
        await resp.write(c.start())
        for ch in up.chunks:  # one write per upstream chunk: the client sees real fragmentation
            await resp.write(c.feed(ch))
        await resp.write(c.finish())
    await resp.write_eof()
    return resp


@pytest.fixture
async def client(aiohttp_server: Any) -> Any:
    app = web.Application()
    app[UPSTREAM] = Upstream()
    app.router.add_post("/v1/responses", responses_route)
    server = await aiohttp_server(app)
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    sdk.upstream = app[UPSTREAM]  # type: ignore[attr-defined]
    yield sdk
    await sdk.close()


def codex_request(**overrides: Any) -> dict[str, Any]:
    """FIRST_TURN as SDK keyword arguments (fields the SDK does not type go in extra_body)."""
    body = {k: v for k, v in FIRST_TURN.items() if k not in ("stream", "model", "client_metadata")}
    return {
        **body,
        "model": "coding-model",
        "extra_body": {"client_metadata": FIRST_TURN["client_metadata"]},
        **overrides,
    }


def assert_tool_output(output: list[Any]) -> None:
    kinds = [(o.type, getattr(o, "name", None)) for o in output]
    assert ("message", None) in kinds
    calls = [o for o in output if o.type in ("function_call", "custom_tool_call")]
    assert [(c.type, c.call_id, c.name, c.namespace) for c in calls] == [
        ("function_call", "call_exec", "exec_command", None),
        ("custom_tool_call", "call_patch", "apply_patch", None),
        ("function_call", "call_gh", "search_code", "mcp__github__"),
    ]
    assert json.loads(calls[0].arguments) == {"cmd": "pytest -q", "workdir": "/w"}
    assert calls[1].input == PATCH
    assert json.loads(calls[2].arguments) == {"q": "flaky"}


async def test_stream_helper_final_response_text_reasoning_usage(client: Any):
    client.upstream.chunks = TEXT_STREAM
    async with client.responses.stream(model="coding-model", input="hi", instructions="be brief") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas == ["Hello", ", world."]
    assert final.id == "resp_sdk1" and final.status == "completed" and final.model == "coding-model"
    assert final.output_text == "Hello, world."
    reasoning = [o for o in final.output if o.type == "reasoning"]
    assert reasoning[0].summary[0].text == "The user greets; answer briefly."
    assert final.usage.model_dump(exclude_none=True) == EXPECTED_USAGE


async def test_stream_helper_codex_tools(client: Any):
    client.upstream.chunks = TOOL_STREAM
    async with client.responses.stream(**codex_request()) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    assert final.output_text == "Checking."
    assert_tool_output(final.output)
    assert final.usage.model_dump(exclude_none=True) == EXPECTED_USAGE
    custom = "".join(e.delta for e in events if e.type == "response.custom_tool_call_input.delta")
    assert custom == PATCH
    assert [e.sequence_number for e in events] == list(range(len(events)))
    sent = client.upstream.seen[-1]
    assert sent["tools"] == CODEX_TOOLS and sent["stream"] is True


async def test_create_stream_true_raw_events(client: Any):
    client.upstream.chunks = TOOL_STREAM
    stream = await client.responses.create(**codex_request(), stream=True)
    events = [e async for e in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    done_items = [e.item for e in events if e.type == "response.output_item.done"]
    assert_tool_output(done_items)
    assert events[-1].response.output == done_items
    args = "".join(
        e.delta
        for e in events
        if e.type == "response.function_call_arguments.delta" and e.item_id == done_items[1].id
    )
    assert json.loads(args) == {"cmd": "pytest -q", "workdir": "/w"}


async def test_create_not_streamed(client: Any):
    client.upstream.completion = TOOL_COMPLETION
    resp = await client.responses.create(**codex_request())
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "Checking."
    assert resp.output[0].type == "reasoning" and resp.output[0].summary[0].text == "run the tests"
    assert_tool_output(resp.output)
    assert resp.usage.model_dump(exclude_none=True) == EXPECTED_USAGE


async def test_stream_from_an_anthropic_upstream(client: Any):
    client.upstream.anthropic = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "usage": {
                        "input_tokens": 20,
                        "cache_read_input_tokens": 500,
                        "cache_creation_input_tokens": 80,
                        "output_tokens": 1,
                    }
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Plan."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Patching."}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_p", "name": "apply_patch", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": PATCH_ARGS[:30]},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": PATCH_ARGS[30:]},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 42}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    async with client.responses.stream(**codex_request()) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Patching."
    call = final.output[-1]
    assert call.type == "custom_tool_call" and call.call_id == "toolu_p" and call.input == PATCH
    assert final.usage.model_dump(exclude_none=True) == {
        "input_tokens": 600,
        "input_tokens_details": {"cached_tokens": 500, "cache_write_tokens": 80},
        "output_tokens": 42,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 642,
    }


async def test_incomplete_and_failed_reach_the_sdk(client: Any):
    client.upstream.chunks = [chunk({"content": "cut"}), chunk({}, "length", USAGE)]
    stream = await client.responses.create(model="m", input="hi", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output[0].content[0].text == "cut"

    client.upstream.chunks = [chunk({"content": "par"}), {"error": {"message": "upstream fell over"}}]
    stream = await client.responses.create(model="m", input="hi", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.message == "upstream fell over"
    with pytest.raises(RuntimeError):
        async with client.responses.stream(model="m", input="hi") as helper:
            await helper.get_final_response()  # no response.completed: the helper says so
