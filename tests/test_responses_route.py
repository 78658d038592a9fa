"""`POST /v1/responses` through the gateway with the official openai SDK: every model of the registry,
both upstream formats, streamed and not, tools round-tripped, billed exactly, stateless; and what Codex
needs around it (remote compaction, a WebSocket attempt refused with 426)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.usage import charge_micro
from ledger.keys import Keyspace
from tests.fakes.upstream import FakeToolCall, FakeUpstream, Script
from tests.gateway_harness import Gateway, running_gateway
from tests.test_proxy import PRICES
from tests.test_sdk_clients import UPSTREAM_API, USAGE, billed_usage, script_for

MODELS = ["deepseek-test", "gpt-test", "claude-test"]
SHELL = {
    "type": "function",
    "name": "exec_command",
    "description": "Run a shell command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
    "strict": False,
}
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/s"},
}
NAMESPACE = {
    "type": "namespace",
    "name": "mcp__files",
    "description": "files",
    "tools": [{"type": "function", "name": "stat", "description": "stat", "parameters": {"type": "object", "properties": {}}}],
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


@pytest.fixture
async def gw(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, public_base_url="https://cp.example") as g:
        yield g


def sdk(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


async def assert_billed(gw: Gateway, script: Script, model: str, *, stream: bool, n: int = 1) -> None:
    rows = await gw.settled(n)
    row = rows[-1]
    usage = billed_usage(script, model, stream)
    prices = PRICES[model]
    assert row["model"] == model and row["status"] == "ok"
    assert row["charge_micro"] == charge_micro(usage, **prices)
    await gw.reconcile_ok()


@pytest.mark.parametrize("model", MODELS)
async def test_create_answers_text_on_every_upstream_and_bills_exactly(gw: Gateway, fake: FakeUpstream, model: str) -> None:
    fake.script = script_for(model, text="Paris is sunny.")
    key = await gw.funded_key(100)
    client = sdk(gw, key)
    resp = await client.responses.create(model=model, instructions="Be brief.", input="Weather in Paris?", store=False)
    assert resp.output_text == "Paris is sunny."
    assert resp.model == model and resp.status == "completed"
    assert resp.usage is not None and resp.usage.output_tokens == USAGE.output
    up = fake.requests[-1].body
    if UPSTREAM_API[model] == "openai":
        assert up["messages"][0] == {"role": "system", "content": "Be brief."}
    else:
        assert up["system"] == "Be brief."
    await assert_billed(gw, fake.script, model, stream=False)
    await client.close()


@pytest.mark.parametrize("model", MODELS)
async def test_stream_with_tools_round_trips_function_custom_and_namespaced_calls(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    key = await gw.funded_key(100)
    client = sdk(gw, key)
    tools: Any = [SHELL, APPLY_PATCH, NAMESPACE]
    # Turn 1: the model calls the shell tool and the freeform apply_patch.
    patch = "*** Begin Patch\n*** End Patch"
    fake.script = script_for(
        model,
        text="",
        tool_calls=(
            FakeToolCall("exec_command", '{"cmd": "ls"}'),
            FakeToolCall("apply_patch", orjson.dumps({"input": patch}).decode()),
        ),
    )
    async with client.responses.stream(model=model, input="list files then patch", tools=tools, store=False) as stream:
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type in ("function_call", "custom_tool_call")]
    assert [c.type for c in calls] == ["function_call", "custom_tool_call"]
    assert calls[0].name == "exec_command" and orjson.loads(calls[0].arguments) == {"cmd": "ls"}
    assert calls[1].name == "apply_patch" and calls[1].input == patch  # freeform input restored
    await assert_billed(gw, fake.script, model, stream=True)
    # Turn 2: Codex sends the whole conversation back with the outputs; the upstream sees a valid history.
    fake.script = script_for(model, text="Done.")
    history: Any = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files then patch"}]},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "exec_command", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "a.txt"},
        {"type": "custom_tool_call", "call_id": calls[1].call_id, "name": "apply_patch", "input": patch},
        {"type": "custom_tool_call_output", "call_id": calls[1].call_id, "output": "ok"},
    ]
    async with client.responses.stream(model=model, input=history, tools=tools, store=False) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Done."
    up = fake.requests[-1].body
    if UPSTREAM_API[model] == "openai":
        assert [m["role"] for m in up["messages"]] == ["user", "assistant", "tool", "assistant", "tool"]
        names = {t["function"]["name"] for t in up["tools"]}
    else:
        assert [m["role"] for m in up["messages"]] == ["user", "assistant", "user", "assistant", "user"]
        names = {t["name"] for t in up["tools"]}
    assert {"exec_command", "apply_patch"} <= names and len(names) == 3
    await client.close()


@pytest.mark.parametrize("field", [{"store": True}, {"previous_response_id": "resp_1"}])
async def test_the_gateway_keeps_no_conversations(gw: Gateway, fake: FakeUpstream, field: dict[str, Any]) -> None:
    key = await gw.funded_key(100)
    client = sdk(gw, key)
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(model="gpt-test", input="hi", **field)
    assert "keeps no conversations" in str(err.value)
    assert fake.requests == []
    account = await gw.account_of(key)
    assert (await gw.ledger.balance(account)).available_micro == 100_000_000
    await client.close()


async def test_an_empty_account_gets_the_402_for_people(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(None)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key)  # default retries: 402 is not retried
    with pytest.raises(openai.APIStatusError) as err:
        await client.responses.create(model="deepseek-test", input="hi", stream=True)
    assert err.value.status_code == 402
    assert "https://cp.example/topup" in err.value.message and "THB" in err.value.message
    assert fake.requests == []
    await client.close()


async def test_an_upstream_error_mid_stream_ends_in_response_failed_and_still_bills(
    gw: Gateway, fake: FakeUpstream
) -> None:
    fake.script = script_for("deepseek-test", text="a b c d e f g h", text_chunks=8, error_after=3)
    key = await gw.funded_key(100)
    client = sdk(gw, key)
    events = [e.type async for e in await client.responses.create(model="deepseek-test", input="hi", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.failed"
    [row] = await gw.settled(1)
    assert row["status"] == "upstream_error"
    await gw.reconcile_ok()
    await client.close()


@pytest.mark.parametrize("model", ["deepseek-test", "claude-test"])
async def test_remote_compaction_summarises_upstream_and_bills(gw: Gateway, fake: FakeUpstream, model: str) -> None:
    fake.script = script_for(model, text="We listed files and patched a.txt.")
    key = await gw.funded_key(100)
    body = {
        "model": model,
        "instructions": "codex",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "patch a.txt"}]}],
        "tools": [SHELL],
        "parallel_tool_calls": True,
    }
    async with gw.http.post(gw.url + "/v1/responses/compact", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        out = await r.json()
    [item] = out["output"]
    assert item["type"] == "message" and item["role"] == "user"
    assert item["content"][0]["text"].endswith("We listed files and patched a.txt.")
    up = fake.requests[-1].body
    assert "tools" not in up and not up.get("stream")  # a summary, not a turn
    await assert_billed(gw, fake.script, model, stream=False)


async def test_a_websocket_attempt_is_refused_with_426(gw: Gateway) -> None:
    key = await gw.funded_key(1)
    headers = {"Authorization": f"Bearer {key}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with gw.http.get(gw.url + "/v1/responses", headers=headers) as r:
        assert r.status == 426
        assert (await r.json())["error"]["code"] == "upgrade_required"
    async with gw.http.get(gw.url + "/v1/responses", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 405
