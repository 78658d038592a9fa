"""Translation at the gateway: what the upstream receives in each direction, and what cannot be carried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.sse import SSEParser
from gateway.usage import charge_micro
from ledger.keys import Keyspace
from tests.fakes.upstream import DEFAULT_TEXT, FakeToolCall, FakeUpstream, FakeUsage, Script, usage_for
from tests.gateway_harness import UPSTREAM_KEY, Gateway, running_gateway
from tests.test_proxy import PRICES

BETA = "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14"
TOOL_A: dict[str, Any] = {
    "name": "read_file",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
}
TOOL_O: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


@pytest.fixture
async def gw(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake) as g:
        yield g


async def post_anthropic(
    gw: Gateway, key: str, body: dict[str, Any], **headers: str
) -> tuple[int, bytes, Any]:
    h = {"x-api-key": key, "anthropic-version": "2023-06-01", **headers}
    async with gw.http.post(gw.url + "/v1/messages", json=body, headers=h) as r:
        return r.status, await r.read(), r.headers


async def post_openai(gw: Gateway, key: str, body: dict[str, Any], **headers: str) -> tuple[int, bytes, Any]:
    h = {"Authorization": f"Bearer {key}", **headers}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=body, headers=h) as r:
        return r.status, await r.read(), r.headers


async def assert_nothing_charged(gw: Gateway, fake: FakeUpstream, key: str, funds: int) -> None:
    assert fake.requests == []
    account = await gw.account_of(key)
    bal = await gw.ledger.balance(account)
    assert (bal.available_micro, bal.reserved_micro) == (funds, 0)
    assert await gw.metering(account) == []  # refused like any other 400: not metered
    await gw.reconcile_ok()


# ---- Anthropic client -> OpenAI-format upstream --------------------------------------------------


async def test_anthropic_request_reaches_an_openai_upstream_translated(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(100)
    body = {
        "model": "deepseek-test",
        "max_tokens": 100_000,  # above the model's 8192: capped
        "stream": True,
        "system": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": "Open a.txt"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Opening."},
                    {"type": "tool_use", "id": "toolu_01", "name": "read_file", "input": {"path": "a.txt"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01",
                        "content": [{"type": "text", "text": "hello"}],
                    },
                    {"type": "text", "text": "Now summarise."},
                ],
            },
        ],
        "tools": [TOOL_A],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END", "STOP", "HALT", "QUIT", "FIFTH"],
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "u-123"},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }
    status, raw, headers = await post_anthropic(gw, key, body, **{"anthropic-beta": BETA})
    assert status == 200, raw
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in sent.headers and "anthropic-beta" not in sent.headers
    assert "anthropic-version" not in sent.headers
    up = sent.body
    assert up["model"] == "deepseek-upstream"
    assert up["max_tokens"] == 8192
    assert up["stream"] is True and up["stream_options"] == {"include_usage": True}
    assert up["messages"] == [
        {"role": "system", "content": "You are terse.\n\nUse tools."},
        {"role": "user", "content": "Open a.txt"},
        {
            "role": "assistant",
            "content": "Opening.",
            "tool_calls": [
                {
                    "id": "toolu_01",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "a.txt"}'},
                }
            ],
            "reasoning_content": "",
        },
        {"role": "tool", "tool_call_id": "toolu_01", "content": "hello"},
        {"role": "user", "content": "Now summarise."},
    ]
    assert up["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": "Read a file",
                "parameters": TOOL_A["input_schema"],
            },
        }
    ]
    assert up["tool_choice"] == "required" and up["parallel_tool_calls"] is False
    assert up["stop"] == ["END", "STOP", "HALT", "QUIT"]
    assert (up["temperature"], up["top_p"]) == (0.3, 0.9)
    assert "user" not in up  # metadata.user_id (Claude Code's device and session ids) stays here
    for dropped in ("top_k", "thinking", "system", "stop_sequences", "metadata", "tool_result"):
        assert dropped not in up
    # The client got a well-formed Anthropic stream, named with its own model and request id.
    events = SSEParser().feed(raw)
    kinds = [e.event for e in events if e.event != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = orjson.loads(events[0].data)["message"]
    assert start["model"] == "deepseek-test"
    assert start["id"] == "msg_" + headers["x-request-id"][4:]


async def test_tool_choice_for_one_named_tool_and_none(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    base = {
        "model": "gpt-test",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [TOOL_A],
    }
    assert (await post_anthropic(gw, key, {**base, "tool_choice": {"type": "tool", "name": "read_file"}}))[
        0
    ] == 200
    assert fake.requests[-1].body["tool_choice"] == {"type": "function", "function": {"name": "read_file"}}
    assert "parallel_tool_calls" not in fake.requests[-1].body
    assert (await post_anthropic(gw, key, {**base, "tool_choice": {"type": "none"}}))[0] == 200
    assert fake.requests[-1].body["tool_choice"] == "none"
    # tool_choice without tools: dropped (OpenAI rejects it), not refused.
    no_tools = {k: v for k, v in base.items() if k != "tools"}
    assert (await post_anthropic(gw, key, {**no_tools, "tool_choice": {"type": "auto"}}))[0] == 200
    assert "tool_choice" not in fake.requests[-1].body and "tools" not in fake.requests[-1].body
    # Not streaming: no stream, no stream_options upstream.
    assert "stream" not in fake.requests[-1].body and "stream_options" not in fake.requests[-1].body


async def test_thin_balance_lowers_max_tokens_sent_to_a_translated_upstream(
    gw: Gateway, fake: FakeUpstream
) -> None:
    thin = await gw.funded_key(None)
    account = await gw.account_of(thin)
    await gw.ledger.credit(account, 10_000, reference="thin", source="grant")  # ~1,200 tokens at 8 THB/1M
    body = {"model": "deepseek-test", "max_tokens": 8000, "messages": [{"role": "user", "content": "hi"}]}
    status, _, _ = await post_anthropic(gw, thin, body)
    assert status == 200
    sent = fake.requests[-1].body["max_tokens"]
    assert 256 <= sent < 8000
    assert sent * PRICES["deepseek-test"]["out"] // 1_000_000 <= 10_000
    rows = await gw.settled()
    bal = await gw.ledger.balance(account)
    assert bal.available_micro == 10_000 - rows[0]["charge_micro"] >= 0
    await gw.reconcile_ok()


async def test_anthropic_beta_is_forwarded_only_to_anthropic_upstreams(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(100)
    body = {"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
    status, _, _ = await post_anthropic(
        gw, key, body, **{"anthropic-beta": BETA, "anthropic-version": "2023-06-01"}
    )
    assert status == 200
    sent = fake.requests[-1]
    assert sent.headers["anthropic-beta"] == BETA
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and key not in str(dict(sent.headers))
    status, _, _ = await post_anthropic(gw, key, {**body, "model": "gpt-test"}, **{"anthropic-beta": BETA})
    assert status == 200
    assert "anthropic-beta" not in fake.requests[-1].headers


# ---- OpenAI client -> Anthropic upstream ---------------------------------------------------------


async def test_openai_request_reaches_an_anthropic_upstream_translated(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(100)
    body = {
        "model": "claude-test",
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "Open a.txt"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": '{"path":"a.txt"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "Now summarise."}]},
        ],
        "tools": [TOOL_O],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 1.5,
        "top_p": 0.8,
        "seed": 7,
        "user": "u-9",
        "stream_options": {"include_usage": True},
    }
    status, raw, _ = await post_openai(gw, key, body, **{"anthropic-beta": BETA})
    assert status == 200, raw
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers and "anthropic-beta" not in sent.headers
    up = sent.body
    assert up["model"] == "claude-upstream"
    assert up["max_tokens"] == 8192  # none asked: the model's cap
    assert up["stream"] is True and "stream_options" not in up
    assert up["system"] == "You are terse.\n\nUse tools."
    assert up["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Open a.txt"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "read_file", "input": {"path": "a.txt"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "hello"},
                {"type": "text", "text": "Now summarise."},
            ],
        },
    ]
    assert up["tools"] == [
        {"name": "read_file", "description": "Read a file", "input_schema": TOOL_O["function"]["parameters"]}
    ]
    assert up["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert up["stop_sequences"] == ["END"]
    assert (up["temperature"], up["top_p"], up["metadata"]) == (1, 0.8, {"user_id": "u-9"})
    assert "seed" not in up and "parallel_tool_calls" not in up and "user" not in up
    # The client asked for usage: the last chunk before [DONE] is the choices:[] usage chunk.
    events = SSEParser().feed(raw)
    assert events[-1].data == b"[DONE]"
    last = orjson.loads(events[-2].data)
    assert last["choices"] == [] and last["model"] == "claude-test"
    usage = usage_for(fake.script, "anthropic")
    assert usage is not None
    assert last["usage"]["prompt_tokens"] == usage.total_input
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == usage.input_cache_hit


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
async def test_openai_output_cap_becomes_anthropic_max_tokens(
    gw: Gateway, fake: FakeUpstream, field: str
) -> None:
    key = await gw.funded_key(100)
    body = {"model": "claude-test", "messages": [{"role": "user", "content": "x"}], field: 500}
    assert (await post_openai(gw, key, body))[0] == 200
    assert fake.requests[-1].body["max_tokens"] == 500
    assert (await post_openai(gw, key, {**body, field: 50_000}))[0] == 200
    assert fake.requests[-1].body["max_tokens"] == 8192


async def test_translated_openai_stream_hides_usage_unless_asked_and_still_bills(
    gw: Gateway, fake: FakeUpstream
) -> None:
    fake.script = Script(
        usage=FakeUsage(input_cache_hit=500, input_cache_miss=60, cache_write=200, output=33)
    )
    key = await gw.funded_key(100)
    body = {"model": "claude-test", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    status, raw, _ = await post_openai(gw, key, body)
    assert status == 200
    events = SSEParser().feed(raw)
    assert events[-1].data == b"[DONE]"
    chunks = [orjson.loads(e.data) for e in events[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == DEFAULT_TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    rows = await gw.settled()
    usage = usage_for(fake.script, "anthropic")
    assert usage is not None
    assert rows[0]["charge_micro"] == charge_micro(usage, **PRICES["claude-test"])
    assert (
        rows[0]["input_cache_hit_tokens"],
        rows[0]["input_cache_miss_tokens"],
        rows[0]["cache_write_tokens"],
    ) == (500, 260, 200)


async def test_tool_ids_and_arguments_survive_a_translated_stream(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script = Script(text="", tool_calls=(FakeToolCall("read_file", '{"path": "b.txt"}', id="toolu_x9"),))
    key = await gw.funded_key(100)
    body = {
        "model": "claude-test",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [TOOL_O],
    }
    status, raw, _ = await post_openai(gw, key, body)
    assert status == 200
    chunks = [orjson.loads(e.data) for e in SSEParser().feed(raw) if e.data != b"[DONE]"]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"] == "toolu_x9" and calls[0]["function"]["name"] == "read_file"
    assert {tc["index"] for tc in calls} == {0}
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"path": "b.txt"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ---- what cannot be carried: 400 naming the field, in the client's format, nothing charged ---------


ANTHROPIC_REFUSALS = [
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}
            ]
        },
        "messages[0].content[0].source.type",
    ),
]


@pytest.mark.parametrize(("extra", "field"), ANTHROPIC_REFUSALS)
async def test_what_an_openai_upstream_cannot_carry_is_a_400_in_anthropic_format(
    gw: Gateway, fake: FakeUpstream, extra: dict[str, Any], field: str
) -> None:
    key = await gw.funded_key(10)
    body = {
        "model": "deepseek-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "x"}],
        **extra,
    }
    status, raw, headers = await post_anthropic(gw, key, body)
    assert status == 400
    err = orjson.loads(raw)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert field in err["error"]["message"]
    assert headers["x-request-id"].startswith("req_")
    await assert_nothing_charged(gw, fake, key, 10_000_000)


OPENAI_REFUSALS = [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format.type",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}],
                }
            ]
        },
        "messages[0].content[0].type",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}
            ]
        },
        "messages[0].content[0].image_url.url",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "r"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("extra", "field"), OPENAI_REFUSALS)
@pytest.mark.parametrize("stream", [False, True])
async def test_what_an_anthropic_upstream_cannot_carry_is_a_400_in_openai_format(
    gw: Gateway, fake: FakeUpstream, extra: dict[str, Any], field: str, stream: bool
) -> None:
    key = await gw.funded_key(10)
    body = {"model": "claude-test", "stream": stream, "messages": [{"role": "user", "content": "x"}], **extra}
    status, raw, _ = await post_openai(gw, key, body)
    assert status == 400, raw
    err = orjson.loads(raw)["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == field and field.split(".")[0] in err["message"]
    await assert_nothing_charged(gw, fake, key, 10_000_000)


async def test_n_above_one_is_refused_before_anything_is_reserved(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(10)
    body = {"model": "claude-test", "n": 2, "messages": [{"role": "user", "content": "x"}]}
    status, raw, _ = await post_openai(gw, key, body)
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "n"
    await assert_nothing_charged(gw, fake, key, 10_000_000)
    assert await gw.metering() == []


async def test_upstream_keepalives_reach_a_translated_stream_as_sse_comments(gw: Gateway, fake: FakeUpstream) -> None:
    # DeepSeek under load: ": keep-alive" while it thinks. The Anthropic client must see the stream
    # alive (a comment is valid SSE for both formats) and still get a well-formed event sequence.
    fake.script = Script(flavour="deepseek", keepalives=3, first_byte_delay_s=0.3)
    key = await gw.funded_key(10)
    body = {"model": "gpt-test", "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.http.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": key}) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.count(b": keep-alive\n\n") == 3
    events = SSEParser().feed(raw)
    assert events[0].event == "message_start" and events[-1].event == "message_stop"
    text = "".join(
        orjson.loads(e.data)["delta"].get("text", "") for e in events if e.event == "content_block_delta"
    )
    assert text == DEFAULT_TEXT
