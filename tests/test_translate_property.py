"""Property tests: any valid upstream stream, however fragmented, translates into a valid client stream
that carries exactly the same text, reasoning and tool arguments."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_translate_streams import (
    accumulate_anthropic,
    accumulate_openai,
    parse_anthropic_sse,
    parse_openai_sse,
    run_a2o,
    run_o2a,
    validate_anthropic_events,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pieces = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4)
json_args = st.dictionaries(
    st.text(min_size=1, max_size=5),
    st.one_of(
        st.integers(), st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(), max_size=3)
    ),
    max_size=3,
).map(lambda d: json.dumps(d, ensure_ascii=False))


@st.composite
def split(draw: Any, text: str) -> list[str]:
    """Cut a string at random points (OpenAI fragments arguments anywhere)."""
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(len(text) - 1, 1)), max_size=5)))
    cuts = [c for c in cuts if 0 < c < len(text)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def openai_stream(draw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Random chat.completion.chunk list plus what it carries."""
    expected: dict[str, Any] = {"text": "", "reasoning": "", "tools": []}
    deltas: list[dict[str, Any]] = []
    next_tool = 0
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        kind = draw(st.sampled_from(["reasoning", "text", "tools"]))
        if kind == "reasoning":
            for p in draw(pieces):
                deltas.append({"reasoning_content": p})
                expected["reasoning"] += p
        elif kind == "text":
            for p in draw(pieces):
                deltas.append({"content": p})
                expected["text"] += p
        else:
            # A group of parallel calls, each fragmented, possibly interleaved with each other.
            calls = []
            for _ in range(draw(st.integers(min_value=1, max_value=3))):
                args = draw(json_args)
                call_id = f"call_{next_tool}"
                name = draw(st.sampled_from(["Bash", "Read", "mcp__srv__tool"]))
                frags = [
                    {
                        "index": next_tool,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
                frags += [{"index": next_tool, "function": {"arguments": a}} for a in draw(split(args))]
                expected["tools"].append((call_id, name, args))
                calls.append(frags)
                next_tool += 1
            order = draw(st.sampled_from(["sequential", "interleaved", "one_chunk"]))
            if order == "one_chunk":
                deltas.append({"tool_calls": [f for frags in calls for f in frags]})
            elif order == "sequential":
                deltas += [{"tool_calls": [f]} for frags in calls for f in frags]
            else:
                queues = [list(frags) for frags in calls]
                while any(queues):
                    live = [q for q in queues if q]
                    q = draw(st.sampled_from(live))
                    deltas.append({"tool_calls": [q.pop(0)]})
    # Tool blocks come out in the order the calls first appeared upstream.
    first_seen = [f["id"] for d in deltas for f in d.get("tool_calls", []) if "id" in f]
    expected["tools"].sort(key=lambda t: first_seen.index(t[0]))
    usage = {"prompt_tokens": 50, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 20}}
    finish = (
        "tool_calls" if expected["tools"] else draw(st.sampled_from(["stop", "length", "content_filter"]))
    )
    usage_where = draw(st.sampled_from(["finish_chunk", "trailing_chunk", "missing"]))
    chunks = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            "usage": None,
        }
    ]
    for d in deltas:
        chunks.append(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "up",
                "choices": [{"index": 0, "delta": d, "finish_reason": None}],
                "usage": None,
            }
        )
    chunks.append(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
            "usage": usage if usage_where == "finish_chunk" else None,
        }
    )
    if usage_where == "trailing_chunk":
        chunks.append(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "up",
                "choices": [],
                "usage": usage,
            }
        )
    expected["finish"] = finish
    expected["usage_known"] = usage_where != "missing"
    return chunks, expected


@SETTINGS
@given(openai_stream())
def test_any_openai_stream_becomes_a_valid_anthropic_stream_with_the_same_content(case):
    chunks, expected = case
    events = parse_anthropic_sse(run_o2a(chunks))
    validate_anthropic_events(events)
    message = accumulate_anthropic(events)
    assert "".join(b.text for b in message.content if b.type == "text") == expected["text"]
    assert "".join(b.thinking for b in message.content if b.type == "thinking") == expected["reasoning"]
    tool_blocks = [(i, b) for i, b in enumerate(message.content) if b.type == "tool_use"]
    assert [(b.id, b.name) for _, b in tool_blocks] == [(t[0], t[1]) for t in expected["tools"]]
    for (index, block), (_, _, args) in zip(tool_blocks, expected["tools"], strict=True):
        sent = "".join(
            d["delta"]["partial_json"]
            for k, d in events
            if k == "content_block_delta" and d["index"] == index
        )
        assert sent == args
        assert block.input == json.loads(args)
    assert (
        message.stop_reason
        == {
            "stop": "end_turn",
            "length": "max_tokens",
            "content_filter": "refusal",
            "tool_calls": "tool_use",
        }[expected["finish"]]
    )
    usage = next(d for k, d in events if k == "message_delta")["usage"]
    assert usage["input_tokens"] == (30 if expected["usage_known"] else 777)


@st.composite
def anthropic_stream(draw: Any) -> tuple[list[list[Any]], dict[str, Any]]:
    expected: dict[str, Any] = {"text": "", "reasoning": "", "tools": []}
    events: list[list[Any]] = [
        [
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "usage": {"input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 1},
                },
            },
        ]
    ]
    for index in range(draw(st.integers(min_value=0, max_value=6))):
        kind = draw(st.sampled_from(["thinking", "text", "tool_use"]))
        if kind == "thinking":
            events.append(
                [
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    },
                ]
            )
            for p in draw(pieces):
                events.append(
                    [
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "thinking_delta", "thinking": p},
                        },
                    ]
                )
                expected["reasoning"] += p
            events.append(
                [
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": "sig"},
                    },
                ]
            )
        elif kind == "text":
            events.append(
                [
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                ]
            )
            for p in draw(pieces):
                events.append(
                    [
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": p},
                        },
                    ]
                )
                expected["text"] += p
        else:
            args = draw(json_args)
            tool_id = f"toolu_{index}"
            events.append(
                [
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {}},
                    },
                ]
            )
            for p in draw(split(args)):
                events.append(
                    [
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": p},
                        },
                    ]
                )
            expected["tools"].append((tool_id, args))
        events.append(["content_block_stop", {"type": "content_block_stop", "index": index}])
        if draw(st.booleans()):
            events.append(["ping", {"type": "ping"}])
    stop = (
        "tool_use"
        if expected["tools"]
        else draw(st.sampled_from(["end_turn", "max_tokens", "stop_sequence", "refusal"]))
    )
    events.append(
        [
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 3},
            },
        ]
    )
    events.append(
        [
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
        ]
    )
    events.append(["message_stop", {"type": "message_stop"}])
    expected["finish"] = {
        "end_turn": "stop",
        "stop_sequence": "stop",
        "max_tokens": "length",
        "refusal": "content_filter",
        "tool_use": "tool_calls",
    }[stop]
    return events, expected


@SETTINGS
@given(anthropic_stream(), st.booleans())
def test_any_anthropic_stream_becomes_valid_openai_chunks_with_the_same_content(case, include_usage):
    events, expected = case
    chunks, done = parse_openai_sse(run_a2o(events, include_usage=include_usage))
    assert done
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish_chunks) == 1
    usage_chunks = [c for c in chunks if not c["choices"]]
    if include_usage:
        assert usage_chunks == [chunks[-1]]
        # Cumulative message_delta usage is replaced, not summed: 9, not 12.
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 12,
            "completion_tokens": 9,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 7},
        }
    else:
        assert usage_chunks == []
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
    assert reasoning == expected["reasoning"]
    snapshot = accumulate_openai(chunks, final=False)
    choice = snapshot.choices[0]
    assert (choice.message.content or "") == expected["text"]
    assert choice.finish_reason == expected["finish"]
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.arguments) for c in calls] == expected["tools"]
