"""Parsing and structural checking of Responses API event streams, shared by the translator tests."""

from __future__ import annotations

import json
from typing import Any

TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")


def parse_responses_sse(raw: bytes) -> list[dict[str, Any]]:
    """Every frame must be ``event: <type>\\ndata: <json>`` with the same type inside."""
    events: list[dict[str, Any]] = []
    for frame in raw.decode().split("\n\n"):
        if not frame or frame.startswith(":"):
            continue
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        data = json.loads(lines[1][len("data: ") :])
        assert data["type"] == lines[0][len("event: ") :]
        events.append(data)
    return events


def validate_responses_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the stream's invariants; returns what it carried (text, reasoning, calls, terminal)."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    terminals = [t for t in types if t in TERMINAL]
    assert len(terminals) == 1 and types[-1] == terminals[0], types
    if types[-1] == "error":
        assert len(events) == 1
        return {"terminal": "error", "items": []}
    assert types[:2] == ["response.created", "response.in_progress"]
    rid = events[0]["response"]["id"]
    open_item: dict[str, Any] | None = None
    pieces: list[str] = []
    items: list[dict[str, Any]] = []
    for e in events[2:-1]:
        t = e["type"]
        if t == "response.output_item.added":
            assert open_item is None, "one item at a time"
            assert e["output_index"] == len(items)
            open_item = e["item"]
            pieces = []
            continue
        assert open_item is not None, t
        assert e["output_index"] == len(items)
        if t != "response.output_item.done":
            assert e["item_id"] == open_item["id"]
        if t.endswith(".delta"):
            pieces.append(e["delta"])
        elif t == "response.output_text.done":
            assert e["text"] == "".join(pieces)
        elif t == "response.function_call_arguments.done":
            assert e["arguments"] == "".join(pieces)
        elif t == "response.custom_tool_call_input.done":
            assert e["input"] == "".join(pieces)
        elif t == "response.reasoning_summary_text.done":
            assert e["text"] == "".join(pieces)
        elif t == "response.output_item.done":
            item = e["item"]
            assert item["id"] == open_item["id"] and item["type"] == open_item["type"]
            whole = "".join(pieces)
            if item["type"] == "message":
                assert item["content"][0]["text"] == whole
            elif item["type"] == "function_call":
                assert item["arguments"] == whole and item["call_id"] == open_item["call_id"]
            elif item["type"] == "custom_tool_call":
                assert item["input"] == whole and item["call_id"] == open_item["call_id"]
            elif item["type"] == "reasoning":
                assert item["summary"][0]["text"] == whole
            items.append(item)
            open_item = None
        else:
            assert t in (
                "response.content_part.added",
                "response.content_part.done",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_part.done",
            ), t
    last = events[-1]
    assert last["response"]["id"] == rid
    if last["type"] != "response.failed":
        assert open_item is None, "every item added is done"
        assert last["response"]["output"] == items
        usage = last["response"]["usage"]
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    return {"terminal": last["type"], "items": items, "response": last["response"]}


def carried(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Text, reasoning and tool calls of output items, in order."""
    out: dict[str, Any] = {"text": "", "reasoning": "", "calls": []}
    for item in items:
        if item["type"] == "message":
            out["text"] += item["content"][0]["text"]
        elif item["type"] == "reasoning":
            out["reasoning"] += item["summary"][0]["text"]
        elif item["type"] == "function_call":
            out["calls"].append((item["call_id"], item.get("namespace"), item["name"], item["arguments"]))
        elif item["type"] == "custom_tool_call":
            out["calls"].append(
                (item["call_id"], item.get("namespace"), item["name"], {"input": item["input"]})
            )
    return out
