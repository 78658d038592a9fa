"""Claude Code's gateway contract at the gateway: its requests on every upstream format, model aliases,
the 402 written for people, and upstream errors passed through unchanged.

The fake upstream enforces the real rules a translating gateway can break (roles, DeepSeek's
reasoning_content in thinking mode, Anthropic's thinking budget), so a 200 here means the upstream
would have accepted what the gateway sent.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.models import load_registry
from gateway.settings import ConfigError
from gateway.sse import SSEParser
from ledger.keys import Keyspace
from tests.fakes.upstream import FakeToolCall, FakeUpstream, Script
from tests.gateway_harness import Gateway, running_gateway
from tests.test_translated_proxy import post_anthropic, post_openai

FIXTURES = Path(__file__).parent / "fixtures" / "translate"

# The operator's choice for Claude Code's own names: a DeepSeek-like model in thinking-capable mode.
ALIASES = """
[models."ds-think"]
provider = "fake-openai"
upstream_model = "deepseek-chat"
price_input_cache_hit = "0.5"
price_input_cache_miss = "2"
price_output = "8"
max_output_tokens = 8192
aliases = ["claude-*", "opus", "sonnet", "haiku", "claude-haiku-*"]
reasoning = "deepseek"
structured_output = "json_object"

[models."claude-big"]
provider = "fake-anthropic"
upstream_model = "claude-upstream-big"
price_input_cache_hit = "3"
price_input_cache_miss = "30"
price_output = "150"
max_output_tokens = 64000
"""

CC_HEADERS = {
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "mid-conversation-system-2026-04-07,effort-2025-11-24",
    "x-app": "cli",
    "anthropic-version": "2023-06-01",
}
DEVICE_USER_ID = '{"device_id":"d3v1c3","account_uuid":"","session_id":"5e55-10n"}'


def _tools(n: int = 24) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = [
        {
            "name": "Read",
            "description": "Reads a file",
            "input_schema": {
                "type": "object",
                "properties": {"file_path": {"type": "string"}},
                "required": ["file_path"],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        },
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    ]
    for i in range(n - len(tools)):
        tools.append({
            "name": f"mcp__srv__tool_{i}",
            "description": "d",
            "input_schema": {"type": "object", "properties": {}},
            "defer_loading": i % 2 == 0,
            "strict": i % 3 == 0,
        })
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    return tools


def claude_code_body(model: str = "claude-opus-4-8", **extra: Any) -> dict[str, Any]:
    """Shaped like Claude Code 2.1's first turn for a model name it does not know as an older Claude."""
    return {
        "model": model,
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code."},
            {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                    {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {"role": "system", "content": "Available agent types: general-purpose"},
        ],
        "tools": _tools(),
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": DEVICE_USER_ID},
        **extra,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


@pytest.fixture
async def gw(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Gateway]:
    async with running_gateway(
        redis_client, clean_keyspace, tmp_path, fake, extra_models=ALIASES, public_base_url="https://cp.example"
    ) as g:
        yield g


def _events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(e.event, orjson.loads(e.data)) for e in SSEParser().feed(raw)]


# ---- Anthropic client -> OpenAI-format upstream ------------------------------------------------------


async def test_claude_code_first_turn_on_an_alias_reaches_deepseek_valid_and_answers(
    gw: Gateway, fake: FakeUpstream
) -> None:
    fake.script = Script(text="Hello there", reasoning="let me think", flavour="deepseek")
    key = await gw.funded_key(100)
    status, raw, _ = await post_anthropic(gw, key, claude_code_body(), **CC_HEADERS)
    assert status == 200, raw
    up = fake.requests[-1].body
    assert up["model"] == "deepseek-chat"
    roles = [m["role"] for m in up["messages"]]
    assert roles == ["system", "user"]  # the trailing system message folded into the user turn
    assert up["messages"][1]["content"].endswith(
        "<system-reminder>\nAvailable agent types: general-purpose\n</system-reminder>"
    )
    assert up["thinking"] == {"type": "enabled"}  # adaptive thinking -> DeepSeek's thinking mode
    assert up["reasoning_effort"] == "high"  # output_config.effort, on DeepSeek's own ladder
    names = [t["function"]["name"] for t in up["tools"]]
    assert "web_search" not in names and len(names) == 23  # the server tool is dropped, not refused
    text = orjson.dumps(up).decode()
    for gone in ("cache_control", "defer_loading", "strict", "context_management", "output_config", "d3v1c3"):
        assert gone not in text
    assert "user" not in up and "metadata" not in up
    events = _events(raw)
    start = next(obj for ev, obj in events if ev == "message_start")
    assert start["message"]["model"] == "claude-opus-4-8"  # the name the client sent
    kinds = [obj["content_block"]["type"] for ev, obj in events if ev == "content_block_start"]
    assert kinds == ["thinking", "text"]
    [row] = await gw.settled(1)
    assert row["model"] == "ds-think" and row["status"] == "ok"
    await gw.reconcile_ok()


async def test_a_tool_turn_carries_thinking_back_as_reasoning_content_in_thinking_mode(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(100)
    body = claude_code_body(stream=False)
    body["messages"] = [
        {"role": "user", "content": "read a.txt"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read it", "signature": "c2ln"},
                {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"file_path": "a.txt"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "A"}]},
            ],
        },
        {"role": "system", "content": "reminder"},
    ]
    status, raw, _ = await post_anthropic(gw, key, body, **CC_HEADERS)
    assert status == 200, raw
    up = fake.requests[-1].body
    assistant = up["messages"][2]
    assert assistant["reasoning_content"] == "I should read it"
    assert [m["role"] for m in up["messages"]] == ["system", "user", "assistant", "tool", "user"]
    assert "<system-reminder>\nreminder\n</system-reminder>" in up["messages"][-1]["content"]


async def test_the_fake_upstream_refuses_a_thinking_tool_turn_without_reasoning_content(fake: FakeUpstream) -> None:
    # The rule the previous test relies on is really enforced (DeepSeek answers 400 otherwise).
    import aiohttp

    body = {
        "model": "deepseek-chat",
        "thinking": {"type": "enabled"},
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"},
        ],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(fake.openai_base_url + "/chat/completions", json=body) as r:
            assert r.status == 400
            assert "reasoning_content" in (await r.json())["error"]["message"]


async def test_structured_output_becomes_the_upstream_response_format(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    body = {
        "model": "claude-haiku-4-5-20251001",
        "max_tokens": 512,
        "messages": [{"role": "user", "content": "title this session"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    headers = {**CC_HEADERS, "anthropic-beta": "structured-outputs-2025-12-15"}
    status, raw, _ = await post_anthropic(gw, key, body, **headers)
    assert status == 200, raw
    up = fake.requests[-1].body
    assert up["response_format"] == {"type": "json_object"}  # DeepSeek has no json_schema mode
    assert up["messages"][0]["role"] == "system" and '"title"' in up["messages"][0]["content"]
    assert orjson.loads(raw)["model"] == "claude-haiku-4-5-20251001"
    # A model whose upstream takes json_schema gets it as such.
    status, raw, _ = await post_anthropic(gw, key, {**body, "model": "gpt-test"}, **headers)
    assert status == 200, raw
    rf = fake.requests[-1].body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == schema


async def test_thinking_is_dropped_where_the_upstream_has_no_reasoning_control(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    status, raw, _ = await post_anthropic(gw, key, claude_code_body("gpt-test", stream=False), **CC_HEADERS)
    assert status == 200, raw
    up = fake.requests[-1].body
    assert "thinking" not in up and "reasoning_effort" not in up


# ---- Anthropic client -> Anthropic upstream (same format) -------------------------------------------


async def test_same_format_forwards_betas_and_fields_unchanged_but_not_the_device_id(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(100)
    body = claude_code_body("claude-big", stream=False)
    status, raw, _ = await post_anthropic(gw, key, body, **CC_HEADERS, **{"anthropic-workspace-id": "wrk_1"})
    assert status == 200, raw
    sent = fake.requests[-1]
    assert sent.headers["anthropic-beta"] == CC_HEADERS["anthropic-beta"]
    assert sent.headers["anthropic-workspace-id"] == "wrk_1"  # every anthropic-* header, an open list
    assert sent.headers.getall("anthropic-version") == ["2023-06-01"]
    up = sent.body
    for field in ("system", "messages", "tools", "thinking", "output_config", "context_management"):
        assert up[field] == body[field]
    tag = up["metadata"]["user_id"]
    assert tag.startswith("cp_") and "d3v1c3" not in tag
    await post_anthropic(gw, key, body, **CC_HEADERS)
    assert fake.requests[-1].body["metadata"]["user_id"] == tag  # stable per key


async def test_a_lowered_max_tokens_keeps_the_thinking_budget_valid(gw: Gateway, fake: FakeUpstream) -> None:
    # An Anthropic SDK request with max_tokens 64000 and a 13190 budget on a thin balance: the gateway
    # lowers max_tokens, and must lower the budget with it or the upstream refuses the request.
    key = await gw.funded_key(None)
    account = await gw.account_of(key)
    await gw.ledger.credit(account, 2_000_000, reference="thin", source="grant")
    body = {
        "model": "claude-big",
        "max_tokens": 64000,
        "thinking": {"type": "enabled", "budget_tokens": 13190},
        "messages": [{"role": "user", "content": "hi"}],
    }
    status, raw, _ = await post_anthropic(gw, key, body, **{"anthropic-version": "2023-06-01"})
    assert status == 200, raw
    up = fake.requests[-1].body
    assert up["max_tokens"] < 64000
    assert 1024 <= up["thinking"]["budget_tokens"] < up["max_tokens"]
    # With interleaved thinking the budget may exceed max_tokens: left as sent.
    fake.reset()
    betas = {"anthropic-beta": "interleaved-thinking-2025-05-14"}
    status, raw, _ = await post_anthropic(gw, key, body, **betas)
    assert status == 200, raw
    assert fake.requests[-1].body["thinking"]["budget_tokens"] == 13190


async def test_a_budget_that_cannot_stay_valid_drops_thinking(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(None)
    account = await gw.account_of(key)
    await gw.ledger.credit(account, 250_000, reference="thinner", source="grant")
    body = {
        "model": "claude-big",
        "max_tokens": 64000,
        "thinking": {"type": "enabled", "budget_tokens": 30000},
        "messages": [{"role": "user", "content": "hi"}],
    }
    status, raw, _ = await post_anthropic(gw, key, body)
    assert status == 200, raw
    up = fake.requests[-1].body
    # Scaled with the cap the budget would fall under Anthropic's 1024 minimum.
    assert 30000 * up["max_tokens"] // 64000 < 1024 and "thinking" not in up


async def test_upstream_errors_pass_through_unchanged_in_the_same_format(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    fake.enqueue(Script(status=529, error_type="overloaded_error", error_message="Overloaded"))
    status, raw, headers = await post_anthropic(gw, key, claude_code_body("claude-big", stream=False), **CC_HEADERS)
    assert status == 529
    assert orjson.loads(raw) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": "req_fake",  # the upstream's own body, not one of ours
    }
    assert headers["x-request-id"].startswith("req_")
    fake.enqueue(Script(status=400, error_message="prompt is too long: 250000 tokens > 200000 maximum"))
    status, raw, _ = await post_anthropic(gw, key, claude_code_body("claude-big", stream=False), **CC_HEADERS)
    assert status == 400 and b"prompt is too long: 250000 tokens > 200000 maximum" in raw
    # Across formats the status stays and the body is translated to the client's format.
    fake.enqueue(Script(status=429, error_message="slow down"))
    status, raw, _ = await post_anthropic(gw, key, claude_code_body(stream=False))
    assert status == 429
    err = orjson.loads(raw)
    assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error"


# ---- the 402 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
async def test_the_402_is_written_for_people(gw: Gateway, fake: FakeUpstream, fmt: str) -> None:
    key = await gw.funded_key(None)
    account = await gw.account_of(key)
    await gw.ledger.credit(account, 1_000, reference="crumbs", source="grant")
    if fmt == "anthropic":
        status, raw, headers = await post_anthropic(gw, key, claude_code_body(stream=False))
        err = orjson.loads(raw)["error"]
        assert err["type"] == "billing_error"
    else:
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        status, raw, headers = await post_openai(gw, key, body)
        err = orjson.loads(raw)["error"]
    assert status == 402 and headers["x-should-retry"] == "false"
    message = err["message"]
    assert "THB" in message and "0.001 THB is available" in message
    assert "https://cp.example/topup" in message
    assert "max_tokens" not in message  # no advice a Claude Code user cannot follow
    assert err["available_micro"] == 1_000 and err["needed_micro"] > 1_000
    assert fake.requests == []


# ---- aliases and discovery -------------------------------------------------------------------------------


async def test_models_lists_plain_aliases_for_claude_code_discovery(gw: Gateway) -> None:
    key = await gw.funded_key(1)
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    async with gw.http.get(gw.url + "/v1/models?limit=1000", headers=headers, allow_redirects=False) as r:
        assert r.status == 200
        listing = await r.json()
    ids = [m["id"] for m in listing["data"]]
    assert {"opus", "sonnet", "haiku", "ds-think", "claude-big"} <= set(ids)
    assert not any("*" in i for i in ids)
    assert all(m["type"] == "model" for m in listing["data"])
    async with gw.http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        assert {"opus", "ds-think"} <= {m["id"] for m in (await r.json())["data"]}


async def test_an_exact_model_name_beats_a_pattern_and_unknown_names_are_404(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    body = {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    status, _, _ = await post_anthropic(gw, key, body)
    assert status == 200 and fake.requests[-1].body["model"] == "claude-upstream"  # a model, not the pattern
    status, _, _ = await post_anthropic(gw, key, {**body, "model": "sonnet"})
    assert status == 200 and fake.requests[-1].body["model"] == "deepseek-chat"
    status, raw, _ = await post_anthropic(gw, key, {**body, "model": "gpt-nope"})
    assert status == 404 and orjson.loads(raw)["error"]["type"] == "not_found_error"


def test_registry_alias_rules(tmp_path: Path) -> None:
    base = """
currency = "THB"
[providers.p]
base_url = "http://x"
format = "openai"
[models.a]
provider = "p"
price_input_cache_miss = "1"
price_output = "1"
aliases = ["claude-*", "fast"]
[models.b]
provider = "p"
price_input_cache_miss = "1"
price_output = "1"
aliases = ["claude-*-haiku-*"]
"""
    f = tmp_path / "m.toml"
    f.write_text(base)
    reg = load_registry(f, {})
    assert reg.get("claude-3-5-haiku-2024").name == "b"  # type: ignore[union-attr]  # the more specific pattern
    assert reg.get("claude-opus-4-8").name == "a"  # type: ignore[union-attr]
    assert reg.get("fast").name == "a" and reg.get("a").name == "a"  # type: ignore[union-attr]
    assert reg.get("gpt") is None
    assert [n for n, _ in reg.listed_names()] == ["a", "b", "fast"]
    f.write_text(base.replace('"fast"', '"b"'))
    with pytest.raises(ConfigError, match="already a model's name"):
        load_registry(f, {})
    f.write_text(base.replace('["claude-*-haiku-*"]', '["fast"]'))
    with pytest.raises(ConfigError, match="taken by a"):
        load_registry(f, {})


def test_the_shipped_registry_answers_claude_codes_default_names() -> None:
    from gateway.settings import DEFAULT_MODELS_FILE

    reg = load_registry(DEFAULT_MODELS_FILE, {})
    for name in ("claude-opus-4-8", "claude-sonnet-4-6", "claude-haiku-4-5-20251001", "opus", "sonnet", "haiku"):
        assert reg.get(name) is reg.models["deepseek-chat"], name
    assert reg.get("claude-sonnet-4-5") is reg.models["claude-sonnet-4-5"]  # its own model wins
    embedded = reg.with_aliases_to("demo")
    assert embedded.get("claude-opus-4-8[1m]") is reg.models["demo"]


def test_claude_code_shaped_bodies_translate_for_every_capability() -> None:
    from gateway.models import Capabilities
    from gateway.translate import anthropic_to_openai_request

    for caps in (Capabilities(), Capabilities("deepseek", "json_object"), Capabilities("openai", "json_schema")):
        body = claude_code_body()
        before = copy.deepcopy(body)
        out = anthropic_to_openai_request(body, upstream_model="m", max_tokens=8192, capabilities=caps)
        assert body == before  # pure: the client's body is not touched
        assert [m["role"] for m in out["messages"]] == ["system", "user"]
        assert ("reasoning_effort" in out) == (caps.reasoning != "none")
        assert ("thinking" in out) == (caps.reasoning == "deepseek")


async def test_a_deepseek_reasoning_tool_call_round_trips_through_claude_codes_history(
    gw: Gateway, fake: FakeUpstream
) -> None:
    # Turn 1: DeepSeek thinks and calls Read; the client sees thinking + tool_use blocks.
    fake.enqueue(Script(reasoning="need the file", text="", tool_calls=(FakeToolCall("Read", '{"file_path": "a"}'),),
                        flavour="deepseek"))
    key = await gw.funded_key(100)
    status, raw, _ = await post_anthropic(gw, key, claude_code_body(stream=False), **CC_HEADERS)
    assert status == 200, raw
    message = orjson.loads(raw)
    blocks = message["content"]
    assert [b["type"] for b in blocks] == ["thinking", "tool_use"]
    # Turn 2: Claude Code sends the assistant turn back with a tool_result; DeepSeek must get its
    # reasoning back or it refuses (the fake enforces that).
    body = claude_code_body(stream=False)
    body["messages"] = [
        body["messages"][0],
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": blocks[1]["id"], "content": "A"}]},
    ]
    status, raw, _ = await post_anthropic(gw, key, body, **CC_HEADERS)
    assert status == 200, raw
    assert fake.requests[-1].body["messages"][2]["reasoning_content"] == "need the file"


@pytest.mark.parametrize(
    ("thinking", "effort", "deepseek", "openai_style"),
    [
        ({"type": "adaptive"}, "max", {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}, {"reasoning_effort": "high"}),
        ({"type": "enabled", "budget_tokens": 2000}, None, {"thinking": {"type": "enabled"}, "reasoning_effort": "low"}, {"reasoning_effort": "low"}),
        ({"type": "enabled", "budget_tokens": 31999}, None, {"thinking": {"type": "enabled"}, "reasoning_effort": "high"}, {"reasoning_effort": "high"}),
        ({"type": "adaptive"}, None, {"thinking": {"type": "enabled"}}, {"reasoning_effort": "high"}),
        ({"type": "disabled"}, None, {"thinking": {"type": "disabled"}}, {}),
        (None, "low", {"reasoning_effort": "low"}, {"reasoning_effort": "low"}),
        (None, None, {}, {}),
    ],
)
def test_reasoning_controls_per_upstream_style(thinking: Any, effort: Any, deepseek: Any, openai_style: Any) -> None:
    from gateway.translate.thinking import openai_reasoning

    body: dict[str, Any] = {}
    if thinking:
        body["thinking"] = thinking
    if effort:
        body["output_config"] = {"effort": effort}
    assert openai_reasoning(body, "deepseek") == deepseek
    assert openai_reasoning(body, "openai") == openai_style
    assert openai_reasoning(body, "none") == {}
