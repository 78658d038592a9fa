"""Requests recorded from the real Claude Code (2.1.332, content replaced by placeholders) translate into
requests a real OpenAI-format upstream accepts, for every capability a model can declare."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.models import Capabilities
from gateway.translate import ToolNameMap, anthropic_to_openai_request
from tests.fakes.upstream import openai_request_problem

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "translate").glob("claude_code_*.json"))
CAPABILITIES = [
    Capabilities(),
    Capabilities("deepseek", "json_object"),
    Capabilities("openai", "json_schema"),
    Capabilities("none", "none"),
]


def recorded(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(path.read_text())["body"]
    return body


def test_the_fixtures_are_claude_code_shaped() -> None:
    assert len(FIXTURES) >= 4
    bodies = [recorded(p) for p in FIXTURES]
    assert all(b["thinking"]["type"] == "adaptive" and "context_management" in b for b in bodies)
    assert any(m["role"] == "system" for b in bodies for m in b["messages"])
    assert any(t.get("defer_loading") for b in bodies for t in b["tools"])


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("caps", CAPABILITIES, ids=lambda c: f"{c.reasoning}-{c.structured_output}")
def test_a_recorded_claude_code_request_becomes_a_valid_openai_request(path: Path, caps: Capabilities) -> None:
    body = recorded(path)
    before = copy.deepcopy(body)
    names = ToolNameMap()
    out = anthropic_to_openai_request(body, upstream_model="deepseek-chat", max_tokens=8192, names=names, capabilities=caps)
    assert body == before
    assert openai_request_problem(out) == ""  # what the fake (DeepSeek's rules) refuses
    assert out["messages"][0]["role"] == "system"
    assert all(m["role"] != "system" for m in out["messages"][1:])  # folded into user turns
    assert len(out["tools"]) == len([t for t in body["tools"] if t.get("type") in (None, "custom")])
    text = json.dumps(out)
    for gone in ("cache_control", "defer_loading", "context_management", "output_config", "device_id"):
        assert gone not in text, gone
    assert ("thinking" in out) == (caps.reasoning == "deepseek")
    assert ("reasoning_effort" in out) == (caps.reasoning != "none")
    if caps.reasoning == "deepseek":
        # Thinking mode is on: every tool-calling turn carries reasoning_content back.
        for m in out["messages"]:
            if m.get("tool_calls"):
                assert isinstance(m.get("reasoning_content"), str)
