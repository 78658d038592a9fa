"""The official openai and anthropic SDKs as clients over real HTTP: any client works with any model, billed exactly."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import openai
import pytest
import redis.asyncio as aioredis

from gateway.usage import Usage, charge_micro
from ledger.keys import Keyspace
from tests.fakes.upstream import DEFAULT_TEXT, FakeToolCall, FakeUpstream, FakeUsage, Script, usage_for
from tests.gateway_harness import Gateway, running_gateway
from tests.test_proxy import PRICES

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

# model -> the format its upstream speaks (gateway_harness.MODELS_TOML)
UPSTREAM_API = {"gpt-test": "openai", "deepseek-test": "openai", "claude-test": "anthropic"}
UPSTREAM_NAME = {
    "gpt-test": "gpt-test",
    "deepseek-test": "deepseek-upstream",
    "claude-test": "claude-upstream",
}
# Distinct counts in every bucket, a cache write too, so a mixed-up mapping shows in the bill.
USAGE = FakeUsage(input_cache_hit=300, input_cache_miss=900, output=77, cache_write=120)
USAGE2 = FakeUsage(input_cache_hit=1200, input_cache_miss=40, output=15, cache_write=0)
FUNDS = 100_000_000
WEATHER_TOOL_A: Any = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_TOOL_O: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,  # the SDK's stream helper only accepts strict tools
    },
}
ASK: Any = [{"role": "user", "content": "Weather in Paris and Rome?"}]


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


def script_for(model: str, **fields: Any) -> Script:
    """A script in the upstream's own style: DeepSeek flavour for the DeepSeek model."""
    flavour: Literal["openai", "deepseek"] = "deepseek" if model == "deepseek-test" else "openai"
    return Script(flavour=flavour, **{"usage": USAGE, **fields})


def billed_usage(script: Script, model: str, stream: bool) -> Usage:
    # The gateway always asks OpenAI-format upstreams for usage in the stream.
    usage = usage_for(script, UPSTREAM_API[model], stream=stream, include_usage=True)  # type: ignore[arg-type]
    assert usage is not None
    return usage


async def assert_billed(gw: Gateway, key: str, model: str, expected: list[Usage]) -> None:
    """One metering row per request, each charged price table x usage; the balance agrees."""
    account = await gw.account_of(key)
    rows = await gw.settled(len(expected))
    rows = [r for r in rows if r["account_id"] == account]
    assert len(rows) == len(expected)
    got = sorted(
        (r["input_cache_hit_tokens"], r["input_cache_miss_tokens"], r["output_tokens"]) for r in rows
    )
    want = sorted((u.input_cache_hit, u.metered_miss, u.output) for u in expected)
    assert got == want
    charges = sorted(r["charge_micro"] for r in rows)
    assert charges == sorted(charge_micro(u, **PRICES[model]) for u in expected)
    assert all(r["status"] == "ok" and r["model"] == model for r in rows)
    assert all(r["upstream_model"] == UPSTREAM_NAME[model] and not r["estimated"] for r in rows)
    bal = await gw.ledger.balance(account)
    assert (bal.available_micro, bal.reserved_micro) == (FUNDS - sum(charges), 0)
    await gw.reconcile_ok()


def oai(gw: Gateway, key: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, **{"max_retries": 0, **kw})


def ant(gw: Gateway, key: str, *, bearer: bool = False, **kw: Any) -> anthropic.AsyncAnthropic:
    auth: dict[str, Any] = {"auth_token": key} if bearer else {"api_key": key}
    return anthropic.AsyncAnthropic(base_url=gw.url, **auth, **{"max_retries": 0, **kw})


# ---- plain text --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
async def test_openai_client_plain_text_not_streamed(gw: Gateway, fake: FakeUpstream, model: str) -> None:
    fake.script = script_for(model)
    key = await gw.funded_key(100)
    async with oai(gw, key) as client:
        done = await client.chat.completions.create(model=model, messages=ASK, max_tokens=300)
    assert done.model == model
    assert done.choices[0].message.content == DEFAULT_TEXT
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    usage = billed_usage(fake.script, model, stream=False)
    # OpenAI counts every input token in prompt_tokens, cached ones in cached_tokens.
    assert done.usage.prompt_tokens == usage.total_input
    assert done.usage.prompt_tokens_details is not None
    assert done.usage.prompt_tokens_details.cached_tokens == usage.input_cache_hit
    assert done.usage.completion_tokens == usage.output
    assert fake.requests[-1].body["model"] == UPSTREAM_NAME[model]
    await assert_billed(gw, key, model, [usage])


@pytest.mark.parametrize("model", ["deepseek-test", "claude-test"])
async def test_openai_client_plain_text_streamed_with_usage(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    fake.script = script_for(model)
    key = await gw.funded_key(100)
    async with oai(gw, key) as client:
        stream = await client.chat.completions.create(
            model=model, messages=ASK, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    assert {c.model for c in chunks} == {model}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = billed_usage(fake.script, model, stream=True)
    last = chunks[-1].usage  # DeepSeek puts it on the finish chunk, the others on a choices:[] chunk
    assert last is not None and [c for c in chunks if c.usage is not None] == [chunks[-1]]
    assert (last.prompt_tokens, last.completion_tokens) == (usage.total_input, usage.output)
    await assert_billed(gw, key, model, [usage])


@pytest.mark.parametrize("model", ["deepseek-test", "claude-test"])
@pytest.mark.parametrize("bearer", [False, True])
async def test_anthropic_client_plain_text_not_streamed(
    gw: Gateway, fake: FakeUpstream, model: str, bearer: bool
) -> None:
    fake.script = script_for(model)
    key = await gw.funded_key(100)
    async with ant(gw, key, bearer=bearer) as client:
        msg = await client.messages.create(model=model, max_tokens=300, messages=ASK)
    assert msg.model == model
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == DEFAULT_TEXT  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    usage = billed_usage(fake.script, model, stream=False)
    # Anthropic's input_tokens excludes cache reads and writes; whatever the upstream, the sum holds.
    u = msg.usage
    assert u.cache_read_input_tokens == usage.input_cache_hit
    assert u.input_tokens + (u.cache_creation_input_tokens or 0) == usage.metered_miss
    assert u.output_tokens == usage.output
    await assert_billed(gw, key, model, [usage])


@pytest.mark.parametrize("model", ["gpt-test", "deepseek-test", "claude-test"])
async def test_anthropic_stream_helper_text_and_final_message(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    fake.script = script_for(model, text_chunks=7)
    key = await gw.funded_key(100)
    async with ant(gw, key) as client:
        async with client.messages.stream(model=model, max_tokens=300, messages=ASK) as stream:
            pieces = [t async for t in stream.text_stream]
            msg = await stream.get_final_message()
    assert len(pieces) == 7 and "".join(pieces) == DEFAULT_TEXT
    assert msg.model == model and msg.stop_reason == "end_turn"
    usage = billed_usage(fake.script, model, stream=True)
    assert msg.usage.cache_read_input_tokens == usage.input_cache_hit
    assert msg.usage.input_tokens + (msg.usage.cache_creation_input_tokens or 0) == usage.metered_miss
    assert msg.usage.output_tokens == usage.output
    up = fake.requests[-1]
    if UPSTREAM_API[model] == "openai":
        assert up.body["stream_options"] == {"include_usage": True}
    await assert_billed(gw, key, model, [usage])


# ---- tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["deepseek-test", "claude-test"])
@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_client_tool_use_turn(
    gw: Gateway, fake: FakeUpstream, model: str, stream: bool
) -> None:
    call = FakeToolCall("get_weather", '{"city": "Paris"}', id="toolu_call_A1")
    first = script_for(model, text="Checking.", tool_calls=(call,))
    second = script_for(model, text="Sunny in Paris.", usage=USAGE2)
    fake.enqueue(first, second)
    key = await gw.funded_key(100)
    msg: anthropic.types.Message
    async with ant(gw, key) as client:
        if stream:
            async with client.messages.stream(
                model=model, max_tokens=300, messages=ASK, tools=[WEATHER_TOOL_A]
            ) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(
                model=model, max_tokens=300, messages=ASK, tools=[WEATHER_TOOL_A]
            )
        assert msg.stop_reason == "tool_use"
        assert [b.type for b in msg.content] == ["text", "tool_use"]
        use = msg.content[1]
        assert use.type == "tool_use"
        assert (use.id, use.name, use.input) == ("toolu_call_A1", "get_weather", {"city": "Paris"})
        history: list[Any] = [
            *ASK,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22C sunny"}],
            },
        ]
        answer = await client.messages.create(
            model=model, max_tokens=300, messages=history, tools=[WEATHER_TOOL_A]
        )
    assert answer.content[0].text == "Sunny in Paris."  # type: ignore[union-attr]
    assert answer.stop_reason == "end_turn"
    sent = fake.requests[-1].body
    if UPSTREAM_API[model] == "openai":
        assistant, result = sent["messages"][-2:]
        assert assistant["tool_calls"][0]["id"] == "toolu_call_A1"
        assert assistant["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        }
        assert result == {"role": "tool", "tool_call_id": "toolu_call_A1", "content": "22C sunny"}
    else:
        assistant, result = sent["messages"][-2:]
        assert assistant["content"][1]["id"] == "toolu_call_A1"
        assert result["content"][0] == {
            "type": "tool_result",
            "tool_use_id": "toolu_call_A1",
            "content": "22C sunny",
        }
    await assert_billed(
        gw, key, model, [billed_usage(first, model, stream), billed_usage(second, model, False)]
    )


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_client_tool_use_turn(gw: Gateway, fake: FakeUpstream, model: str, stream: bool) -> None:
    call = FakeToolCall("get_weather", '{"city": "Paris"}', id="call_O1")
    first = script_for(model, text="", tool_calls=(call,))
    second = script_for(model, text="Sunny in Paris.", usage=USAGE2)
    fake.enqueue(first, second)
    key = await gw.funded_key(100)
    done: openai.types.chat.ChatCompletion
    async with oai(gw, key) as client:
        if stream:
            async with client.chat.completions.stream(model=model, messages=ASK, tools=[WEATHER_TOOL_O]) as s:
                async for _ in s:
                    pass
                done = await s.get_final_completion()
        else:
            done = await client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER_TOOL_O])
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].type == "function"
        assert (calls[0].id, calls[0].function.name) == ("call_O1", "get_weather")
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
        history: list[Any] = [
            *ASK,
            choice.message.model_dump(include={"role", "content", "tool_calls"}, exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": "22C sunny"},
        ]
        answer = await client.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL_O])
    assert answer.choices[0].message.content == "Sunny in Paris."
    sent = fake.requests[-1].body
    if UPSTREAM_API[model] == "anthropic":
        assistant, result = sent["messages"][-2:]
        assert assistant["role"] == "assistant"
        assert assistant["content"][-1] == {
            "type": "tool_use",
            "id": "call_O1",
            "name": "get_weather",
            "input": {"city": "Paris"},
        }
        assert result == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_O1", "content": "22C sunny"}],
        }
    else:
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_O1", "content": "22C sunny"}
        assert sent["messages"][-2]["tool_calls"][0]["id"] == "call_O1"
    await assert_billed(
        gw, key, model, [billed_usage(first, model, stream), billed_usage(second, model, False)]
    )


PARALLEL = (
    FakeToolCall("get_weather", '{"city": "Paris"}', id="call_par_1"),
    FakeToolCall("get_weather", '{"city": "Rome"}', id="call_par_2"),
    FakeToolCall("get_time", "{}", id="call_par_3"),
)


@pytest.mark.parametrize("model", ["deepseek-test", "claude-test"])
@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_client_parallel_tool_calls(
    gw: Gateway, fake: FakeUpstream, model: str, stream: bool
) -> None:
    fake.script = script_for(model, text="", tool_calls=PARALLEL, argument_chunks=4)
    key = await gw.funded_key(100)
    tools = [WEATHER_TOOL_A, {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]
    msg: anthropic.types.Message
    async with ant(gw, key) as client:
        if stream:
            async with client.messages.stream(model=model, max_tokens=300, messages=ASK, tools=tools) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model=model, max_tokens=300, messages=ASK, tools=tools)
    uses = [(b.id, b.name, b.input) for b in msg.content if b.type == "tool_use"]
    assert uses == [
        ("call_par_1", "get_weather", {"city": "Paris"}),
        ("call_par_2", "get_weather", {"city": "Rome"}),
        ("call_par_3", "get_time", {}),
    ]
    assert msg.stop_reason == "tool_use"
    await assert_billed(gw, key, model, [billed_usage(fake.script, model, stream)])


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_client_parallel_tool_calls(
    gw: Gateway, fake: FakeUpstream, model: str, stream: bool
) -> None:
    fake.script = script_for(model, text="", tool_calls=PARALLEL, argument_chunks=4)
    key = await gw.funded_key(100)
    time_tool: Any = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            "strict": True,
        },
    }
    done: openai.types.chat.ChatCompletion
    async with oai(gw, key) as client:
        if stream:
            async with client.chat.completions.stream(
                model=model, messages=ASK, tools=[WEATHER_TOOL_O, time_tool]
            ) as s:
                done = await s.get_final_completion()
        else:
            done = await client.chat.completions.create(
                model=model, messages=ASK, tools=[WEATHER_TOOL_O, time_tool]
            )
    calls = done.choices[0].message.tool_calls or []
    got = [(c.id, c.function.name, c.function.arguments.replace(" ", "")) for c in calls]  # type: ignore[union-attr]
    assert got == [
        ("call_par_1", "get_weather", '{"city":"Paris"}'),
        ("call_par_2", "get_weather", '{"city":"Rome"}'),
        ("call_par_3", "get_time", "{}"),
    ]
    assert done.choices[0].finish_reason == "tool_calls"
    await assert_billed(gw, key, model, [billed_usage(fake.script, model, stream)])


# ---- reasoning -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_deepseek_reasoning_becomes_thinking_blocks_for_the_anthropic_client(
    gw: Gateway, fake: FakeUpstream, stream: bool
) -> None:
    fake.script = script_for("deepseek-test", reasoning="First, recall the forecast.", reasoning_chunks=3)
    key = await gw.funded_key(100)
    msg: anthropic.types.Message
    async with ant(gw, key) as client:
        if stream:
            async with client.messages.stream(model="deepseek-test", max_tokens=300, messages=ASK) as s:
                thinking = "".join([e.thinking async for e in s if e.type == "thinking"])
                msg = await s.get_final_message()
            assert thinking == "First, recall the forecast."
        else:
            msg = await client.messages.create(model="deepseek-test", max_tokens=300, messages=ASK)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    block = msg.content[0]
    assert block.type == "thinking" and block.thinking == "First, recall the forecast."
    assert block.signature  # the SDK and Claude Code expect one on every thinking block
    assert msg.content[1].text == DEFAULT_TEXT  # type: ignore[union-attr]
    await assert_billed(gw, key, "deepseek-test", [billed_usage(fake.script, "deepseek-test", stream)])


# ---- faults --------------------------------------------------------------------------------------


async def _assert_fault_settled(gw: Gateway, key: str, model: str) -> None:
    rows = await gw.settled(1)
    assert len(rows) == 1 and rows[0]["status"] == "upstream_error"
    row = rows[0]
    usage = Usage(
        row["input_cache_hit_tokens"],
        row["input_cache_miss_tokens"] - row["cache_write_tokens"],
        row["output_tokens"],
        row["cache_write_tokens"],
    )
    assert row["charge_micro"] == charge_micro(usage, **PRICES[model])
    bal = await gw.ledger.balance(await gw.account_of(key))
    assert (bal.available_micro, bal.reserved_micro) == (FUNDS - row["charge_micro"], 0)
    await gw.reconcile_ok()


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
async def test_anthropic_client_error_mid_stream_raises_api_error(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    fake.script = script_for(model, text_chunks=8, error_after=4)
    key = await gw.funded_key(100)
    pieces: list[str] = []
    async with ant(gw, key) as client:
        with pytest.raises(anthropic.APIError) as info:
            async with client.messages.stream(model=model, max_tokens=300, messages=ASK) as s:
                async for text in s.text_stream:
                    pieces.append(text)
    assert pieces and DEFAULT_TEXT.startswith("".join(pieces))  # the part before the error arrived
    assert "".join(pieces) != DEFAULT_TEXT
    assert info.value.body is not None
    await _assert_fault_settled(gw, key, model)


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
async def test_openai_client_error_mid_stream_raises_api_error(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    fake.script = script_for(model, text_chunks=8, error_after=5)
    key = await gw.funded_key(100)
    pieces: list[str] = []
    async with oai(gw, key) as client:
        with pytest.raises(openai.APIError):
            async with client.chat.completions.stream(model=model, messages=ASK) as s:
                async for event in s:
                    if event.type == "content.delta":
                        pieces.append(event.delta)
    assert pieces and DEFAULT_TEXT.startswith("".join(pieces)) and "".join(pieces) != DEFAULT_TEXT
    await _assert_fault_settled(gw, key, model)


def _count(metrics_text: str, route: str, status: int) -> int:
    m = re.search(
        rf'gateway_requests_total{{route="{re.escape(route)}",status="{status}"}} (\d+)', metrics_text
    )
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
async def test_empty_account_402_surfaces_in_both_sdks_and_is_not_retried(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    key = await gw.funded_key(None)
    # Default retries on: the SDKs would retry a 429/5xx twice; x-should-retry: false stops them.
    async with oai(gw, key, max_retries=2) as oclient:
        with pytest.raises(openai.APIStatusError) as oinfo:
            await oclient.chat.completions.create(model=model, messages=ASK)
    async with ant(gw, key, max_retries=2) as aclient:
        with pytest.raises(anthropic.APIStatusError) as ainfo:
            async with aclient.messages.stream(model=model, max_tokens=300, messages=ASK) as s:
                await s.get_final_message()
    for exc in (oinfo.value, ainfo.value):
        assert exc.status_code == 402
        assert exc.response.headers["x-should-retry"] == "false"
        assert "Top up" in exc.message
    assert isinstance(oinfo.value, openai.APIStatusError) and oinfo.value.code == "insufficient_credit"
    assert isinstance(ainfo.value, anthropic.APIStatusError)
    assert ainfo.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert fake.requests == []
    async with gw.http.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert _count(text, "/v1/chat/completions", 402) == 1
    assert _count(text, "/v1/messages", 402) == 1
    assert await gw.metering() == []
