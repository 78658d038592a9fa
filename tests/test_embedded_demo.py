"""The embedded default as a newcomer meets it: Claude Code's own model names answer with the local demo
model, which streams, plays one tool round trip, and is billed like any model."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.appkeys import DEMO
from gateway.demo import DEMO_REPLY, scripted_turn
from gateway.settings import Settings

READ_TOOL = {
    "name": "Read",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]},
}


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(database_path=tmp_path / "var" / "gw.sqlite3", public_base_url=url, shutdown_grace_s=1.0)
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield url, app[DEMO][1]
    finally:
        await runner.cleanup()


async def test_claude_codes_default_model_name_streams_from_the_demo(embedded: tuple[str, str]) -> None:
    url, key = embedded
    client = anthropic.AsyncAnthropic(base_url=url, auth_token=key, api_key=None, max_retries=0)
    async with client.messages.stream(
        model="claude-opus-4-8", max_tokens=32000, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == DEMO_REPLY
    assert final.model == "claude-opus-4-8" and final.usage.output_tokens > 0
    models = await openai.AsyncOpenAI(base_url=url + "/v1", api_key=key).models.list()
    assert {"demo", "opus", "sonnet", "haiku"} <= {m.id for m in models.data}
    await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_the_demo_plays_a_tool_round_trip_in_the_anthropic_format(embedded: tuple[str, str], stream: bool) -> None:
    url, key = embedded
    client = anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)
    ask: list[Any] = [{"role": "user", "content": "<system-reminder>see CLAUDE.md</system-reminder>\nread notes.txt"}]

    async def turn(messages: list[Any]) -> Any:
        kwargs: dict[str, Any] = {"model": "sonnet", "max_tokens": 1000, "messages": messages, "tools": [READ_TOOL]}
        if not stream:
            return await client.messages.create(**kwargs)
        async with client.messages.stream(**kwargs) as s:
            return await s.get_final_message()

    first = await turn(ask)
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "Read" and call.input == {"file_path": "notes.txt"}
    history = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "alpha\nbeta"}]},
        {"role": "system", "content": "a reminder from the agent"},
    ]
    second = await turn(history)
    answer = "".join(b.text for b in second.content if b.type == "text")
    assert "2 lines" in answer and "alpha" in answer
    await client.close()


def test_the_demo_script_without_a_read_tool_or_a_path_gives_the_fixed_reply() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "read notes.txt"}]}
    assert scripted_turn(body) == (DEMO_REPLY, None)
    tools = [{"type": "function", "function": {"name": "read", "parameters": {
        "type": "object", "properties": {"filePath": {"type": "string"}}, "required": ["filePath"]}}}]
    assert scripted_turn({**body, "messages": [{"role": "user", "content": "hello"}], "tools": tools}) == (DEMO_REPLY, None)
    text, call = scripted_turn({**body, "tools": tools})
    assert text == "" and call is not None and call["function"]["arguments"] == '{"filePath":"notes.txt"}'
