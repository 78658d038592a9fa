"""Claude Code (the real CLI, `claude -p`) through the gateway, on an OpenAI- and an Anthropic-format model.

Driven as the README tells users: only ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_AUTH_TOKEN`` (plus
``ANTHROPIC_MODEL`` except in the default-model test), telemetry, error reporting, update checks
and non-essential traffic off. Reading a file needs no permission prompt with ``--allowedTools
Read``, so the suite does not need ``--dangerously-skip-permissions`` (which Claude Code refuses as
root unless IS_SANDBOX=1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from tests.compat.agent_upstream import FINAL_PREFIX
from tests.compat.conftest import remember_sent
from tests.compat.harness import (
    FORMATS,
    MODEL_OF_FORMAT,
    NPM_BIN,
    ClientRun,
    Compat,
    client_binary,
    compat_setup,
    run_client,
)

pytestmark = pytest.mark.timeout(180)
CLIENT = "Claude Code"
TIMEOUT = 90.0


def claude_env(c: Compat, key: str, model: str | None) -> dict[str, str]:
    extra = {
        "ANTHROPIC_BASE_URL": c.gw.url,
        "ANTHROPIC_AUTH_TOKEN": key,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    if model is not None:
        extra["ANTHROPIC_MODEL"] = model
    return c.env(c.home(), **extra)


async def run_claude(
    c: Compat, prompt: str, *, model: str | None, key: str | None = None, stream: bool = False
) -> ClientRun:
    argv = [client_binary(NPM_BIN / "claude"), "-p", prompt, "--allowedTools", "Read", "--max-turns", "5"]
    if stream:
        argv += ["--output-format", "stream-json", "--verbose", "--include-partial-messages"]
    else:
        argv += ["--output-format", "json"]
    return await run_client(argv, env=claude_env(c, key or c.key, model), cwd=c.project, timeout=TIMEOUT)


def result_of(run: ClientRun) -> dict[str, Any]:
    """The final ``result`` object of a json or stream-json run."""
    for line in reversed(run.stdout.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("type") == "result":
            return obj
    raise AssertionError(f"no result object in Claude Code's output\n{run.describe()}")


def streamed_text(run: ClientRun) -> str:
    """The text deltas of a stream-json run with --include-partial-messages."""
    text = []
    for line in run.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        event = obj.get("event") if isinstance(obj, dict) and obj.get("type") == "stream_event" else None
        delta = event.get("delta") if isinstance(event, dict) else None
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            text.append(delta.get("text", ""))
    return "".join(text)


def messages_requests(c: Compat) -> list[Any]:
    return [r for r in c.recorder.requests if r.path == "/v1/messages"]


@pytest.mark.compat(CLIENT, "text")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_text(compat: Compat, fmt: str) -> None:
    run = await run_claude(compat, "Say hello.", model=MODEL_OF_FORMAT[fmt])
    result = result_of(run)
    assert result.get("is_error") is False, run.describe()
    assert compat.marker in result["result"], run.describe()
    sent = messages_requests(compat)
    assert sent and all(r.status == 200 for r in sent), [(r.path, r.status) for r in sent]
    assert sent[0].body["stream"] is True  # Claude Code always streams


@pytest.mark.compat(CLIENT, "stream")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_stream(compat: Compat, fmt: str) -> None:
    run = await run_claude(compat, "Say hello.", model=MODEL_OF_FORMAT[fmt], stream=True)
    assert compat.marker in streamed_text(run), run.describe()
    assert compat.marker in result_of(run)["result"], run.describe()


@pytest.mark.compat(CLIENT, "tool round trip")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_round_trip(compat: Compat, fmt: str) -> None:
    run = await run_claude(compat, compat.read_prompt, model=MODEL_OF_FORMAT[fmt])
    result = result_of(run)
    assert f"{FINAL_PREFIX} {compat.token}" in result["result"], (
        f"replies={compat.upstream.replies}; {run.describe()}"
    )
    assert compat.upstream.replies[:2] == ["tool_call:Read", f"final:{compat.token}"]


@pytest.mark.compat(CLIENT, "402 message")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_402_message(compat: Compat, fmt: str) -> None:
    run = await run_claude(compat, "Say hello.", model=MODEL_OF_FORMAT[fmt], key=await compat.thin_key())
    shown = result_of(run)["result"]
    assert "credit" in shown and "/topup" in shown, run.describe()
    assert [r.status for r in messages_requests(compat)] == [402]  # no retry on a 402
    assert not compat.upstream.requests


DEFAULT_MODEL_ALIAS = """
[models."coder"]
provider = "fake-openai"
upstream_model = "coder-upstream"
aliases = ["claude-*", "opus", "sonnet", "haiku"]
price_input_cache_hit = "0.5"
price_input_cache_miss = "2"
price_output = "8"
max_output_tokens = 8192
"""


@pytest.mark.compat(CLIENT, "default model (no ANTHROPIC_MODEL)")
@pytest.mark.parametrize("fmt", ["openai"])
async def test_default_model_through_alias(
    redis_client: aioredis.Redis,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    fmt: str,
) -> None:
    async with compat_setup(redis_client, clean_keyspace, tmp_path, extra_models=DEFAULT_MODEL_ALIAS) as c:
        run = await run_claude(c, "Say hello.", model=None)
        remember_sent(request, c)
        result = result_of(run)
        assert c.marker in result["result"], run.describe()
        asked = {r.body["model"] for r in messages_requests(c)}
        assert all(name.startswith("claude-") for name in asked), asked  # its own default name
        assert {r.body["model"] for r in c.upstream.requests} == {"coder-upstream"}


DEEPSEEK_THINKING = """
[models."deepseek-think"]
provider = "fake-openai"
upstream_model = "deepseek-think-upstream"
reasoning = "deepseek"
price_input_cache_hit = "0.5"
price_input_cache_miss = "2"
price_output = "8"
max_output_tokens = 8192
"""


@pytest.mark.compat(CLIENT, "tool round trip, DeepSeek thinking mode")
@pytest.mark.parametrize("fmt", ["openai"])
async def test_tool_round_trip_deepseek_thinking(
    redis_client: aioredis.Redis,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    fmt: str,
) -> None:
    """DeepSeek in thinking mode answers 400 unless a tool turn carries its reasoning_content back."""
    async with compat_setup(redis_client, clean_keyspace, tmp_path, extra_models=DEEPSEEK_THINKING) as c:
        c.upstream.flavour = "deepseek"
        c.upstream.reasoning = "The user wants the file; read it first."
        run = await run_claude(c, c.read_prompt, model="deepseek-think")
        remember_sent(request, c)
        result = result_of(run)
        assert f"{FINAL_PREFIX} {c.token}" in result["result"], (
            f"replies={c.upstream.replies}; {run.describe()}"
        )
        assert c.upstream.replies[:2] == ["tool_call:Read", f"final:{c.token}"], c.upstream.replies
        tool_turn = c.upstream.requests[1].body
        assert tool_turn.get("thinking") == {"type": "enabled"}  # the rule was in force
        assistant = [m for m in tool_turn["messages"] if m.get("role") == "assistant" and m.get("tool_calls")]
        assert assistant and assistant[0].get("reasoning_content") == c.upstream.reasoning
