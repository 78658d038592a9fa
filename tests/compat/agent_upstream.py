"""A scripted "agent" upstream: the fake provider that decides its answer from what the request holds.

Real coding clients send their own prompts, tools and history; a fixed script cannot follow them.
``AgentUpstream`` reuses the fake provider's wire formats (OpenAI Chat Completions and Anthropic
Messages, streamed or not, usage in the final chunk when ``include_usage`` is set) and picks the
answer per request:

- the last message carries a tool result -> final text quoting the token found in that result
  (``FINAL_PREFIX`` + token), so the client's output proves the tool ran and its result came back;
- a user message holds ``READ_TRIGGER`` and the request offers the client's own file-reading tool
  (Claude Code ``Read``/``file_path``, opencode ``read``/``filePath``, Codex ``exec_command``/``cmd``
  or ``shell``/``command``) -> a call of that tool on ``read_path``;
- otherwise -> ``answer`` (a text with the test's unique marker).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson
from aiohttp import web

from tests.fakes.upstream import Api, FakeToolCall, FakeUpstream, Script

__all__ = ["FINAL_PREFIX", "READ_TRIGGER", "TOKEN_RE", "AgentUpstream", "read_call_for"]

READ_TRIGGER = "COMPAT-READ-FILE"
FINAL_PREFIX = "The file holds the token"
TOKEN_RE = re.compile(r"COMPAT-TOKEN-[0-9a-f]{12}")


def _tools(api: Api, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name -> its JSON-schema ``properties``, whatever the format."""
    out: dict[str, dict[str, Any]] = {}
    for tool in body.get("tools") or ():
        if not isinstance(tool, dict):
            continue
        if api == "openai":
            fn = tool.get("function") or {}
            name, schema = fn.get("name"), fn.get("parameters")
        else:
            name, schema = tool.get("name"), tool.get("input_schema")
        if isinstance(name, str):
            props = schema.get("properties") if isinstance(schema, dict) else None
            out[name] = props if isinstance(props, dict) else {}
    return out


def read_call_for(tools: dict[str, dict[str, Any]], path: str) -> FakeToolCall | None:
    """A call of the client's own file-reading tool on ``path``, or None when none is offered."""

    def call(name: str, args: dict[str, Any]) -> FakeToolCall:
        return FakeToolCall(name, orjson.dumps(args).decode())

    for name, props in tools.items():
        if name.lower() == "read" and "file_path" in props:
            return call(name, {"file_path": path})  # Claude Code
        if name.lower() == "read" and "filePath" in props:
            return call(name, {"filePath": path})  # opencode
    for name, props in tools.items():
        if name == "exec_command" and "cmd" in props:
            return call(name, {"cmd": f"cat {path}"})  # Codex's unified exec tool
        if name in ("shell", "shell_command", "local_shell") and "command" in props:
            kind = props["command"].get("type") if isinstance(props["command"], dict) else None
            return call(name, {"command": ["cat", path] if kind == "array" else f"cat {path}"})
    return None


def _text_of(content: Any) -> str:
    """All the text in a message content (string, or a list of parts/blocks, nested results)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        parts = [v for k, v in content.items() if k in ("text", "content", "output")]
        return "\n".join(_text_of(p) for p in parts)
    return ""


def _tool_result(api: Api, messages: list[Any]) -> str | None:
    """The text of the tool result(s) in the last message, or None when it carries none."""
    if not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if api == "openai":
        # OpenAI: one role "tool" message per result; several trail the assistant turn.
        results = []
        for message in reversed(messages):
            if not isinstance(message, dict) or message.get("role") != "tool":
                break
            results.append(_text_of(message.get("content")))
        return "\n".join(results) if results else None
    content = last.get("content")
    if last.get("role") != "user" or not isinstance(content, list):
        return None
    results = [_text_of(b) for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    return "\n".join(results) if results else None


def _asks_to_read(messages: list[Any]) -> bool:
    return any(
        isinstance(m, dict) and m.get("role") == "user" and READ_TRIGGER in _text_of(m.get("content"))
        for m in messages
    )


class AgentUpstream(FakeUpstream):
    """``answer`` and ``read_path`` are set by the test; ``replies`` lists what each request got."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = "plain answer"
        self.read_path = ""
        # DeepSeek style: usage on the finish chunk, and with ``reasoning`` set every answer starts
        # with reasoning_content (the fake then enforces its thinking-mode rule on tool turns).
        self.flavour: Literal["openai", "deepseek"] = "openai"
        self.reasoning = ""
        self.replies: list[str] = []  # "text" / "tool_call:<name>" / "final:<token>" / "scripted"

    def plan(self, api: Api, body: dict[str, Any]) -> Script:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        result = _tool_result(api, messages)
        if result is not None:
            found = TOKEN_RE.search(result)
            token = found.group(0) if found else "NO-TOKEN-IN-RESULT"
            self.replies.append(f"final:{token}")
            return self._script(text=f"{FINAL_PREFIX} {token}.")
        if self.read_path and _asks_to_read(messages):
            call = read_call_for(_tools(api, body), self.read_path)
            if call is not None:
                self.replies.append(f"tool_call:{call.name}")
                return self._script(text="", tool_calls=(call,))
        self.replies.append("text")
        return self._script(text=self.answer)

    def _script(self, **fields: Any) -> Script:
        return Script(flavour=self.flavour, reasoning=self.reasoning, **fields)

    async def _answer(self, request: web.Request, api: Api, script: Script, body: Any) -> web.StreamResponse:
        refusal = self._refusal(request, api, body)
        if refusal is not None:
            self.replies.append(f"refused:{refusal.status}")
            return refusal
        if script is self.script and isinstance(body, dict):
            script = self.plan(api, body)
        else:
            self.replies.append("scripted")
        return await super()._answer(request, api, script, body)
