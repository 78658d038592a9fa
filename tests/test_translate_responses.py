"""Non-streaming response translation, stop/finish reason tables, usage mapping and error bodies."""

from __future__ import annotations

import anthropic.types
import openai.types.chat
import pytest

from gateway.errors import ServiceUnavailable
from gateway.translate import (
    ToolNameMap,
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    anthropic_usage_to_openai,
    openai_error_to_anthropic,
    openai_to_anthropic_response,
    openai_usage_to_anthropic,
)
from gateway.translate.names import sanitize_tool_id

LONG = "mcp__server_with_a_long_name__tool_with_an_even_longer_name_that_exceeds_sixty_four"


def _openai_resp(message: dict, finish: str = "stop", usage: dict | None = None) -> dict:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def test_o2a_response_text_thinking_tools_names_and_usage_validate_as_sdk_message():
    names = ToolNameMap()
    short = names.to_upstream(LONG)
    resp = _openai_resp(
        {
            "content": "Here.",
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "functions.Bash:0",
                    "type": "function",
                    "function": {"name": "Bash", "arguments": '{"c": 1}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": short, "arguments": "{broken"}},
            ],
        },
        finish="tool_calls",
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "total_tokens": 120,
            "prompt_cache_hit_tokens": 60,
            "prompt_cache_miss_tokens": 40,
        },
    )
    out = openai_to_anthropic_response(resp, client_model="claude-sonnet-4", names=names, message_id="msg_1")
    msg = anthropic.types.Message.model_validate(out)
    assert msg.model == "claude-sonnet-4" and msg.id == "msg_1"
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert out["content"][2] == {
        "type": "tool_use",
        "id": sanitize_tool_id("functions.Bash:0"),
        "name": "Bash",
        "input": {"c": 1},
    }
    assert out["content"][3]["name"] == LONG
    assert out["content"][3]["input"] == {}  # invalid JSON from the model becomes an empty input
    assert msg.stop_reason == "tool_use"
    assert out["usage"] == {
        "input_tokens": 40,
        "output_tokens": 20,
        "cache_read_input_tokens": 60,
        "cache_creation_input_tokens": 0,
    }


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
        ("weird_new", "end_turn"),
    ],
)
def test_o2a_every_finish_reason_maps(finish, stop):
    out = openai_to_anthropic_response(_openai_resp({"content": "x"}, finish=finish), client_model="m")
    assert out["stop_reason"] == stop


def test_o2a_stop_after_tool_calls_reports_tool_use():
    resp = _openai_resp(
        {
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        finish="stop",
    )
    assert openai_to_anthropic_response(resp, client_model="m")["stop_reason"] == "tool_use"


def test_o2a_insufficient_system_resource_is_overloaded():
    with pytest.raises(ServiceUnavailable):
        openai_to_anthropic_response(
            _openai_resp({"content": ""}, finish="insufficient_system_resource"), client_model="m"
        )


def test_o2a_refusal_becomes_text_with_refusal_stop():
    out = openai_to_anthropic_response(
        _openai_resp({"content": None, "refusal": "I can't."}), client_model="m"
    )
    assert out["content"] == [{"type": "text", "text": "I can't."}]
    assert out["stop_reason"] == "refusal"


def _anthropic_resp(content: list, stop: str = "end_turn", usage: dict | None = None) -> dict:
    return {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-upstream",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 3, "output_tokens": 4},
    }


def test_a2o_response_validates_as_sdk_chat_completion():
    names = ToolNameMap()
    short = names.to_upstream(LONG)
    out = anthropic_to_openai_response(
        _anthropic_resp(
            [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "A"},
                {"type": "text", "text": "B"},
                {"type": "tool_use", "id": "toolu_1", "name": short, "input": {"x": [1]}},
            ],
            stop="tool_use",
            usage={
                "input_tokens": 10,
                "output_tokens": 7,
                "cache_read_input_tokens": 80,
                "cache_creation_input_tokens": 5,
            },
        ),
        client_model="gpt-client",
        names=names,
        completion_id="chatcmpl-1",
        created=5,
    )
    completion = openai.types.chat.ChatCompletion.model_validate(out)
    assert completion.model == "gpt-client" and completion.created == 5
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "AB"
    assert out["choices"][0]["message"]["reasoning_content"] == "hm"
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_1" and call.function.name == LONG and call.function.arguments == '{"x": [1]}'
    assert out["usage"] == {
        "prompt_tokens": 95,
        "completion_tokens": 7,
        "total_tokens": 102,
        "prompt_tokens_details": {"cached_tokens": 80},
    }


def test_a2o_tool_only_answer_has_null_content():
    out = anthropic_to_openai_response(
        _anthropic_resp([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], stop="tool_use"),
        client_model="m",
    )
    assert out["choices"][0]["message"]["content"] is None
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
        ("future_reason", "stop"),
    ],
)
def test_a2o_every_stop_reason_maps(stop, finish):
    out = anthropic_to_openai_response(
        _anthropic_resp([{"type": "text", "text": "x"}], stop=stop), client_model="m"
    )
    assert out["choices"][0]["finish_reason"] == finish


def test_usage_openai_cached_tokens_subset_and_nulls():
    assert openai_usage_to_anthropic(
        {"prompt_tokens": 50, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 20}}
    ) == {
        "input_tokens": 30,
        "output_tokens": 9,
        "cache_read_input_tokens": 20,
        "cache_creation_input_tokens": 0,
    }
    assert openai_usage_to_anthropic(None)["input_tokens"] == 0
    assert openai_usage_to_anthropic({"prompt_tokens": None, "completion_tokens": None})["output_tokens"] == 0
    assert anthropic_usage_to_openai({"input_tokens": 1, "output_tokens": 2})["prompt_tokens_details"] == {
        "cached_tokens": 0
    }


@pytest.mark.parametrize(
    ("status", "body", "err_type"),
    [
        (400, {"error": {"message": "bad field", "type": "invalid_request_error"}}, "invalid_request_error"),
        (401, {"error": {"message": "no key"}}, "authentication_error"),
        (402, {"error": {"message": "Insufficient Balance"}}, "billing_error"),
        (403, {}, "permission_error"),
        (404, {}, "not_found_error"),
        (422, {"error": {"message": "bad"}}, "invalid_request_error"),
        (429, {"error": {"message": "quota", "type": "insufficient_quota"}}, "billing_error"),
        (429, {"error": {"message": "slow down"}}, "rate_limit_error"),
        (500, "<html>oops</html>", "api_error"),
        (503, {"error": {"message": "busy"}}, "overloaded_error"),
        (504, None, "timeout_error"),
        (418, {}, "invalid_request_error"),
        (599, {}, "api_error"),
    ],
)
def test_openai_error_to_anthropic(status, body, err_type):
    out = openai_error_to_anthropic(status, body)
    assert out["type"] == "error"
    assert out["error"]["type"] == err_type
    assert isinstance(out["error"]["message"], str) and out["error"]["message"]


@pytest.mark.parametrize(
    ("status", "body", "openai_type", "code"),
    [
        (
            400,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "m"}},
            "invalid_request_error",
            None,
        ),
        (
            401,
            {"type": "error", "error": {"type": "authentication_error", "message": "m"}},
            "invalid_request_error",
            "invalid_api_key",
        ),
        (
            429,
            {"type": "error", "error": {"type": "rate_limit_error", "message": "m"}},
            "rate_limit_error",
            "rate_limit_exceeded",
        ),
        (
            529,
            {"type": "error", "error": {"type": "overloaded_error", "message": "m"}},
            "server_error",
            "overloaded",
        ),
        (500, b"garbage", "server_error", None),
        (402, {}, "insufficient_quota", "insufficient_quota"),
    ],
)
def test_anthropic_error_to_openai(status, body, openai_type, code):
    out = anthropic_error_to_openai(status, body)
    assert out["error"]["type"] == openai_type
    assert out["error"]["code"] == code
    assert out["error"]["param"] is None
    assert out["error"]["message"]


def test_error_message_is_passed_through_but_bounded():
    out = openai_error_to_anthropic(400, {"error": {"message": "x" * 5000}})
    assert len(out["error"]["message"]) == 500
