"""The fake upstream speaks the real wire formats: raw bytes checked, and the official SDKs accept it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from gateway.sse import SSEEvent, SSEParser
from tests.fakes.upstream import (
    DEFAULT_TEXT,
    DEFAULT_USAGE,
    FakeToolCall,
    FakeUpstream,
    FakeUsage,
    Script,
    fake_upstream,
    split_text,
    usage_for,
)

__all__ = ["fake_upstream"]  # the fixture, imported for pytest

TOOLS = (
    FakeToolCall("read_file", '{"path": "src/main.py", "start": 1, "end": 40}'),
    FakeToolCall("run_shell", '{"command": "pytest -q tests/test_tokens.py"}'),
)
OPENAI_BODY: dict[str, Any] = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}


async def _post(fake: FakeUpstream, path: str, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.url + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


def _events(raw: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(raw) + parser.close()


def _json_events(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for e in _events(raw) if e.data != b"[DONE]"]


# ---- raw wire format --------------------------------------------------------------------------


async def test_openai_stream_without_include_usage_has_no_usage(fake_upstream: FakeUpstream) -> None:
    status, raw = await _post(fake_upstream, "/v1/chat/completions", {**OPENAI_BODY, "stream": True})
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = _json_events(raw)
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == DEFAULT_TEXT
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["model"] == "deepseek-chat" and c["object"] == "chat.completion.chunk" for c in chunks)


async def test_openai_stream_with_include_usage_ends_with_choiceless_usage_chunk(
    fake_upstream: FakeUpstream,
) -> None:
    body = {**OPENAI_BODY, "stream": True, "stream_options": {"include_usage": True}}
    _, raw = await _post(fake_upstream, "/v1/chat/completions", body)
    chunks = _json_events(raw)
    *content, last = chunks
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == DEFAULT_USAGE.input_cache_hit + DEFAULT_USAGE.input_cache_miss
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == DEFAULT_USAGE.input_cache_hit
    assert last["usage"]["completion_tokens"] == DEFAULT_USAGE.output
    assert all(c["usage"] is None for c in content)
    assert len([c for c in content if c["choices"][0]["delta"].get("content")]) == 4


async def test_deepseek_stream_puts_reasoning_first_and_usage_on_finish_chunk(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.script = Script(
        flavour="deepseek", reasoning="Think, then answer.", reasoning_chunks=3, text="Answer.", text_chunks=2
    )
    _, raw = await _post(fake_upstream, "/chat/completions", {**OPENAI_BODY, "stream": True})
    chunks = _json_events(raw)
    kinds = [
        (
            "r"
            if c["choices"][0]["delta"].get("reasoning_content")
            else "c"
            if c["choices"][0]["delta"].get("content")
            else "-"
        )
        for c in chunks
    ]
    assert kinds == ["-", "r", "r", "r", "c", "c", "-"]
    assert (
        "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
        == "Think, then answer."
    )
    finish = chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "stop"
    usage = finish["usage"]
    assert usage["prompt_cache_hit_tokens"] == 256 and usage["prompt_cache_miss_tokens"] == 1024
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
    assert all("usage" not in c for c in chunks[:-1])


async def test_openai_parallel_tool_calls_are_fragmented_by_index(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(text="", tool_calls=TOOLS, argument_chunks=4)
    _, raw = await _post(fake_upstream, "/v1/chat/completions", {**OPENAI_BODY, "stream": True})
    calls: dict[int, dict[str, str]] = {}
    fragments = 0
    for chunk in _json_events(raw):
        for call in chunk["choices"][0]["delta"].get("tool_calls") or ():
            slot = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in call:
                slot["id"] = call["id"]
                slot["name"] = call["function"]["name"]
            slot["arguments"] += call["function"]["arguments"]
            fragments += 1
    assert [c["name"] for c in calls.values()] == ["read_file", "run_shell"]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [json.loads(t.arguments) for t in TOOLS]
    assert calls[0]["id"] != calls[1]["id"]
    assert fragments == 2 * (1 + 4)
    assert _json_events(raw)[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_anthropic_stream_event_sequence(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(
        reasoning="hmm", text="Hello.", tool_calls=TOOLS[:1], usage=FakeUsage(10, 20, 30, 40)
    )
    status, raw = await _post(fake_upstream, "/v1/messages?beta=true", {**ANTHROPIC_BODY, "stream": True})
    assert status == 200
    events = _events(raw)
    for event in events:
        assert orjson.loads(event.data)["type"] == event.event
    names = [e.event for e in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    starts = [orjson.loads(e.data) for e in events if e.event == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "thinking"),
        (1, "text"),
        (2, "tool_use"),
    ]
    deltas = [orjson.loads(e.data)["delta"]["type"] for e in events if e.event == "content_block_delta"]
    assert "signature_delta" in deltas and "input_json_delta" in deltas
    start_usage = orjson.loads(events[0].data)["message"]["usage"]
    assert start_usage == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 40,
        "cache_read_input_tokens": 10,
        "output_tokens": 1,
    }
    delta = orjson.loads(events[-2].data)
    assert delta["usage"] == {"output_tokens": 30}
    assert delta["delta"]["stop_reason"] == "tool_use"


async def test_keepalive_comments_are_on_the_wire(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(keepalives=2, keepalive_every=2)
    _, raw = await _post(fake_upstream, "/v1/chat/completions", {**OPENAI_BODY, "stream": True})
    assert raw.startswith(b": keep-alive\n\n: keep-alive\n\ndata: ")
    assert raw.count(b": keep-alive\n\n") == 2 + 7 // 2


async def test_non_stream_keepalives_are_blank_lines_before_the_json(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(keepalives=3, flavour="deepseek")
    status, raw = await _post(fake_upstream, "/v1/chat/completions", OPENAI_BODY)
    assert status == 200
    assert raw.startswith(b"\n\n\n{")
    assert json.loads(raw)["usage"]["prompt_cache_miss_tokens"] == 1024


async def test_requests_are_recorded_with_path_headers_and_body(fake_upstream: FakeUpstream) -> None:
    await _post(
        fake_upstream,
        "/v1/messages?beta=true",
        ANTHROPIC_BODY,
        **{"anthropic-version": "2023-06-01", "x-api-key": "k"},
    )
    recorded = fake_upstream.requests[-1]
    assert recorded.path == "/v1/messages"
    assert recorded.query_string == "beta=true"
    assert recorded.headers["Anthropic-Version"] == "2023-06-01"
    assert recorded.body == ANTHROPIC_BODY
    assert fake_upstream.completed == 1 and fake_upstream.disconnects == 0


async def test_enqueued_script_answers_only_the_next_request(fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Script(status=503))
    first, _ = await _post(fake_upstream, "/v1/chat/completions", OPENAI_BODY)
    second, _ = await _post(fake_upstream, "/v1/chat/completions", OPENAI_BODY)
    assert (first, second) == (503, 200)


async def test_api_key_is_checked_in_provider_format() -> None:
    async with FakeUpstream(api_key="sk-up") as fake:
        status, raw = await _post(fake, "/v1/messages", ANTHROPIC_BODY, **{"x-api-key": "wrong"})
        assert status == 401
        assert json.loads(raw)["error"]["type"] == "authentication_error"
        status, _ = await _post(fake, "/v1/messages", ANTHROPIC_BODY, **{"x-api-key": "sk-up"})
        assert status == 200
        status, _ = await _post(fake, "/v1/chat/completions", OPENAI_BODY, Authorization="Bearer sk-up")
        assert status == 200


async def test_anthropic_body_without_max_tokens_is_rejected(fake_upstream: FakeUpstream) -> None:
    status, raw = await _post(fake_upstream, "/v1/messages", OPENAI_BODY)
    assert status == 400
    body = json.loads(raw)
    assert body["type"] == "error" and "max_tokens" in body["error"]["message"]


# ---- faults -----------------------------------------------------------------------------------


async def test_die_after_truncates_the_chunked_body(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(die_after=3)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            fake_upstream.url + "/v1/messages", json={**ANTHROPIC_BODY, "stream": True}
        ) as resp:
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in resp.content.iter_any():
                    received += piece
    assert [e.event for e in _events(received)] == ["message_start", "ping", "content_block_start"]
    # The fake cut the line itself; that is not the client going away.
    assert fake_upstream.disconnects == 0


async def test_client_leaving_mid_stream_is_counted(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(text_chunks=50, chunk_delay_s=0.02)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            fake_upstream.url + "/v1/chat/completions", json={**OPENAI_BODY, "stream": True}
        )
        await resp.content.readline()
        resp.close()
        await fake_upstream.wait_disconnects(1, timeout=2)
    assert fake_upstream.disconnects == 1 and fake_upstream.completed == 0
    await fake_upstream.wait_idle()


async def test_hang_never_answers_and_a_client_timeout_counts_as_disconnect(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.script = Script(hang=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(fake_upstream.url + "/v1/messages", json=ANTHROPIC_BODY)
    await fake_upstream.wait_disconnects(1, timeout=2)
    assert fake_upstream.active == 0


async def test_stall_after_keeps_the_connection_silent(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(stall_after=2)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            fake_upstream.url + "/v1/messages", json={**ANTHROPIC_BODY, "stream": True}
        ) as resp:
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"event: message_start")
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"event: ping")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(resp.content.read(1), 0.2)
    await fake_upstream.wait_disconnects(1, timeout=2)


async def test_first_byte_delay_holds_the_headers(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(first_byte_delay_s=0.15)
    started = time.monotonic()
    status, _ = await _post(fake_upstream, "/v1/chat/completions", {**OPENAI_BODY, "stream": True})
    assert status == 200
    assert time.monotonic() - started >= 0.15


async def test_openai_mid_stream_error_is_a_data_error_without_done(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(error_after=2, error_message="boom")
    _, raw = await _post(fake_upstream, "/v1/chat/completions", {**OPENAI_BODY, "stream": True})
    chunks = _json_events(raw)
    assert len(chunks) == 3
    assert chunks[-1] == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert b"[DONE]" not in raw


# ---- official SDKs ----------------------------------------------------------------------------


def _openai_client(fake: FakeUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="sk-test", max_retries=0)


def _anthropic_client(fake: FakeUpstream) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="sk-test", max_retries=0)


async def test_openai_sdk_non_stream(fake_upstream: FakeUpstream) -> None:
    async with _openai_client(fake_upstream) as client:
        completion = await client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.model == "gpt-x"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 256
    assert fake_upstream.requests[-1].headers["Authorization"] == "Bearer sk-test"


async def test_openai_sdk_stream_with_usage(fake_upstream: FakeUpstream) -> None:
    async with _openai_client(fake_upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-x",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 42


async def test_openai_sdk_stream_helper_assembles_parallel_tool_calls(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(text="", tool_calls=TOOLS)
    async with _openai_client(fake_upstream) as client:
        async with client.chat.completions.stream(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["read_file", "run_shell"]
    assert [json.loads(c.function.arguments) for c in calls] == [json.loads(t.arguments) for t in TOOLS]
    assert final.choices[0].finish_reason == "tool_calls"


async def test_openai_sdk_raises_on_http_error(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(status=429, error_message="slow down")
    async with _openai_client(fake_upstream) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 429
    assert isinstance(info.value.body, dict) and info.value.body["message"] == "slow down"


async def test_openai_sdk_raises_on_mid_stream_error(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(error_after=3, error_message="overloaded")
    async with _openai_client(fake_upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen = 0
        with pytest.raises(openai.APIError, match="overloaded"):
            async for _ in stream:
                seen += 1
    assert seen == 3


async def test_anthropic_sdk_non_stream_with_tools_and_thinking(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(
        reasoning="plan", text="Reading.", tool_calls=TOOLS, usage=FakeUsage(5, 6, 7, 8)
    )
    async with _anthropic_client(fake_upstream) as client:
        message = await client.messages.create(
            model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    tool = message.content[2]
    assert tool.type == "tool_use" and tool.input == json.loads(TOOLS[0].arguments)
    assert message.stop_reason == "tool_use"
    assert (
        message.usage.input_tokens,
        message.usage.cache_read_input_tokens,
        message.usage.cache_creation_input_tokens,
    ) == (6, 5, 8)
    headers = fake_upstream.requests[-1].headers
    # This SDK version authenticates with Bearer; older ones send x-api-key. Gateways take both.
    assert headers.get("x-api-key") == "sk-test" or headers.get("Authorization") == "Bearer sk-test"
    assert "anthropic-version" in headers


async def test_anthropic_sdk_stream_accumulates_the_message(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(
        reasoning="step by step", text="Done.", tool_calls=TOOLS, argument_chunks=5, keepalive_every=3
    )
    async with _anthropic_client(fake_upstream) as client:
        async with client.messages.stream(
            model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            message = await stream.get_final_message()
    kinds = [b.type for b in message.content]
    assert kinds == ["thinking", "text", "tool_use", "tool_use"]
    thinking, text, first, second = message.content
    assert (
        thinking.type == "thinking"
        and thinking.thinking == "step by step"
        and thinking.signature == "fake-signature"
    )
    assert text.type == "text" and text.text == "Done."
    assert first.type == "tool_use" and first.input == json.loads(TOOLS[0].arguments)
    assert second.type == "tool_use" and second.input == json.loads(TOOLS[1].arguments)
    assert message.usage.output_tokens == DEFAULT_USAGE.output
    assert message.usage.input_tokens == DEFAULT_USAGE.input_cache_miss


async def test_anthropic_sdk_raises_on_http_error(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(status=529, error_message="Overloaded")
    async with _anthropic_client(fake_upstream) as client:
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(
                model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            )
    assert info.value.status_code == 529
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"


async def test_anthropic_sdk_raises_on_error_event(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(error_after=4)
    async with _anthropic_client(fake_upstream) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(
                model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                async for _ in stream:
                    pass
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"


async def test_sdk_sees_connection_cut_as_an_error(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(die_after=4)
    async with _openai_client(fake_upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


# ---- helpers ----------------------------------------------------------------------------------


def test_split_text_is_deterministic_and_lossless() -> None:
    assert split_text("abcdefghij", 3) == ["abcd", "efgh", "ij"]
    assert split_text("ab", 5) == ["a", "b"]
    assert split_text("", 4) == []
    assert "".join(split_text(DEFAULT_TEXT, 7)) == DEFAULT_TEXT


def test_usage_for_follows_each_provider_style() -> None:
    script = Script(usage=FakeUsage(1, 2, 3, 4))
    anthropic_usage = usage_for(script, "anthropic", stream=True)
    assert anthropic_usage is not None
    assert (
        anthropic_usage.input_cache_hit,
        anthropic_usage.input_cache_miss,
        anthropic_usage.cache_write,
    ) == (1, 2, 4)
    assert usage_for(script, "openai", stream=True) is None  # no include_usage, no usage
    openai_usage = usage_for(script, "openai", stream=True, include_usage=True)
    assert openai_usage is not None and openai_usage.input_cache_miss == 6 and openai_usage.cache_write == 0
    assert usage_for(Script(flavour="deepseek"), "openai", stream=True) is not None
    assert usage_for(Script(usage=None), "anthropic") is None
