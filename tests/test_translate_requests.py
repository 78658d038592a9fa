"""Request translation in both directions, field by field, plus an A->O->A round trip."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway.errors import BadRequest
from gateway.translate import ToolNameMap, anthropic_to_openai_request, openai_to_anthropic_request
from gateway.translate.names import sanitize_tool_id
from gateway.translate.request_to_openai import DOCUMENT_OMITTED

LONG_MCP = "mcp__very_long_server_name_for_testing__and_an_even_longer_tool_name_that_goes_past_64"


def a2o(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return anthropic_to_openai_request(body, upstream_model="deepseek-chat", max_tokens=8192, **kw)


def o2a(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return openai_to_anthropic_request(body, upstream_model="claude-x", max_tokens=4096, **kw)


# --- Anthropic -> OpenAI ------------------------------------------------------------------------


def test_a2o_system_blocks_become_one_system_message_without_cache_control():
    out = a2o(
        {
            "model": "claude-sonnet",
            "max_tokens": 100,
            "system": [
                {"type": "text", "text": "billing header"},
                {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
                }
            ],
        }
    )
    assert out["model"] == "deepseek-chat"
    assert out["messages"] == [
        {"role": "system", "content": "billing header\n\nYou are helpful."},
        {"role": "user", "content": "hi"},
    ]
    assert "cache_control" not in json.dumps(out)
    assert out["max_tokens"] == 100


def test_a2o_system_string_and_max_tokens_capped():
    out = a2o({"max_tokens": 999999, "system": "sys", "messages": [{"role": "user", "content": "x"}]})
    assert out["messages"][0] == {"role": "system", "content": "sys"}
    assert out["max_tokens"] == 8192


def test_a2o_stream_always_asks_for_usage():
    out = a2o({"max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}
    assert "stream_options" not in a2o({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})


def test_a2o_tool_use_and_tool_result_keep_ids_and_put_user_text_after_tool_messages():
    body = {
        "max_tokens": 50,
        "messages": [
            {"role": "user", "content": "list files"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should call ls", "signature": "sig"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "Bash", "input": {"command": "ls"}},
                    {"type": "tool_use", "id": "toolu_01B", "name": "Read", "input": {"path": "a"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "a\nb"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01B",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "no such file"},
                            {"type": "text", "text": "really"},
                        ],
                    },
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
    }
    msgs = a2o(body)["messages"]
    assistant = msgs[1]
    assert assistant["role"] == "assistant"
    assert assistant["content"] == "Let me look."
    assert assistant["reasoning_content"] == "I should call ls"
    assert [c["id"] for c in assistant["tool_calls"]] == ["toolu_01A", "toolu_01B"]
    assert assistant["tool_calls"][0]["type"] == "function"
    assert assistant["tool_calls"][0]["function"]["name"] == "Bash"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"command": "ls"}
    assert msgs[2] == {"role": "tool", "tool_call_id": "toolu_01A", "content": "a\nb"}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_01B", "content": "Error: no such file\nreally"}
    assert msgs[4] == {"role": "user", "content": "thanks"}


def test_a2o_tool_call_turn_without_thinking_gets_empty_reasoning_content():
    msgs = a2o(
        {
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "X", "input": {}}],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
                {"role": "assistant", "content": "done"},
            ],
        }
    )["messages"]
    assert msgs[1]["reasoning_content"] == ""
    assert msgs[1]["content"] is None
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert msgs[3] == {"role": "assistant", "content": "done"}  # no tool calls, no thinking: no field


def test_a2o_images_become_data_urls_and_tool_result_images_move_to_next_user_message():
    msgs = a2o(
        {
            "max_tokens": 5,
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "Shot", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "text", "text": "screenshot"},
                                {
                                    "type": "image",
                                    "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                                },
                            ],
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/x.jpg"}},
                        {"type": "text", "text": "what is this"},
                    ],
                },
            ],
        }
    )["messages"]
    assert msgs[1] == {"role": "tool", "tool_call_id": "t1", "content": "screenshot"}
    assert msgs[2] == {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/x.jpg"}},
            {"type": "text", "text": "what is this"},
        ],
    }


def test_a2o_tools_tool_choice_and_parallel_flag():
    tools = [
        {
            "name": "Bash",
            "description": "run",
            "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral"},
        }
    ]
    out = a2o(
        {
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "tools": tools,
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        }
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "Bash", "parameters": {"type": "object"}, "description": "run"},
        }
    ]
    assert out["tool_choice"] == "required"
    assert out["parallel_tool_calls"] is False
    base = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": tools}
    assert a2o({**base, "tool_choice": {"type": "auto"}})["tool_choice"] == "auto"
    assert "parallel_tool_calls" not in a2o({**base, "tool_choice": {"type": "auto"}})
    assert a2o({**base, "tool_choice": {"type": "none"}})["tool_choice"] == "none"
    assert a2o({**base, "tool_choice": {"type": "tool", "name": "Bash"}})["tool_choice"] == {
        "type": "function",
        "function": {"name": "Bash"},
    }


def test_a2o_long_tool_names_are_shortened_deterministically_and_map_back():
    names = ToolNameMap()
    body = {
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": LONG_MCP, "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]},
        ],
        "tools": [
            {"name": LONG_MCP, "input_schema": {"type": "object"}},
            {"name": "Bash", "input_schema": {}},
        ],
        "tool_choice": {"type": "tool", "name": LONG_MCP},
    }
    out = a2o(body, names=names)
    short = out["tools"][0]["function"]["name"]
    assert len(short) <= 64 and short != LONG_MCP
    assert out["tools"][1]["function"]["name"] == "Bash"
    assert out["tool_choice"]["function"]["name"] == short
    assert out["messages"][1]["tool_calls"][0]["function"]["name"] == short
    assert names.to_client(short) == LONG_MCP
    assert names.to_client("Bash") == "Bash"
    assert names.renamed() == {LONG_MCP: short}
    # Same name, same short form, in a fresh map (a later request of the same conversation).
    again = a2o(body)["tools"][0]["function"]["name"]
    assert again == short
    other = ToolNameMap().to_upstream(LONG_MCP[:-1] + "X")
    assert other != short


def test_a2o_sampling_stops_metadata_and_dropped_fields():
    out = a2o(
        {
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["a", "b", "c", "d", "e"],
            "metadata": {"user_id": "user-123"},
            "thinking": {"type": "enabled", "budget_tokens": 1000},
            "betas": ["x"],
        }
    )
    assert out["temperature"] == 0.3 and out["top_p"] == 0.9
    assert out["stop"] == ["a", "b", "c", "d"]
    for dropped in ("top_k", "metadata", "user", "thinking", "betas", "stop_sequences"):
        assert dropped not in out


def test_a2o_drops_server_tools_and_notes_documents_it_cannot_carry():
    out = a2o(
        {
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": "x"},
                        },
                        {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "r"}]},
                        {"type": "tool_reference", "tool_name": "Grep"},
                        {"type": "text", "text": "q"},
                    ],
                }
            ],
            "tools": [
                {"type": "web_search_20250305", "name": "web_search"},
                {"name": "Read", "input_schema": {"type": "object"}, "strict": True, "defer_loading": True,
                 "cache_control": {"type": "ephemeral"}},
            ],
        }
    )
    assert out["tools"] == [{"type": "function", "function": {"name": "Read", "parameters": {"type": "object"}}}]
    assert out["messages"] == [{"role": "user", "content": f"{DOCUMENT_OMITTED}\n\nr\n\nq"}]
    with pytest.raises(BadRequest) as err:
        a2o({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]})
    assert err.value.param == "messages[0].content[0].source.type"
    with pytest.raises(BadRequest):
        a2o({"max_tokens": 5, "messages": "nope"})


# --- OpenAI -> Anthropic ------------------------------------------------------------------------


def test_o2a_lifts_system_and_developer_messages_from_anywhere():
    out = o2a(
        {
            "model": "gpt",
            "messages": [
                {"role": "system", "content": "one"},
                {"role": "user", "content": "hi"},
                {"role": "developer", "content": [{"type": "text", "text": "two"}]},
                {"role": "user", "content": "again"},
            ],
        }
    )
    assert out["system"] == "one\n\ntwo"
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}
    ]
    assert out["max_tokens"] == 4096 and out["model"] == "claude-x"


def test_o2a_tool_calls_and_consecutive_tool_messages():
    out = o2a(
        {
            "max_completion_tokens": 100,
            "messages": [
                {"role": "user", "content": "do it"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "functions.Bash:0",
                            "type": "function",
                            "function": {"name": "Bash", "arguments": '{"cmd": "ls"}'},
                        },
                        {"id": "call_2", "type": "function", "function": {"name": "Now", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "functions.Bash:0", "content": "a b"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
                {"role": "user", "content": "and?"},
            ],
        }
    )
    assert out["max_tokens"] == 100
    msgs = out["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    bash_id = sanitize_tool_id("functions.Bash:0")
    assert msgs[1]["content"] == [
        {"type": "tool_use", "id": bash_id, "name": "Bash", "input": {"cmd": "ls"}},
        {"type": "tool_use", "id": "call_2", "name": "Now", "input": {}},
    ]
    assert msgs[2]["content"] == [
        {"type": "tool_result", "tool_use_id": bash_id, "content": "a b"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
        {"type": "text", "text": "and?"},
    ]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", bash_id)
    assert sanitize_tool_id("functions.Bash:0") == bash_id  # deterministic
    assert sanitize_tool_id("functions_Bash_0") != bash_id  # no collision with the look-alike


def test_o2a_invalid_tool_arguments_are_a_400_naming_the_field():
    body = {
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
                ],
            },
        ]
    }
    with pytest.raises(BadRequest) as err:
        o2a(body)
    assert err.value.param == "messages[1].tool_calls[0].function.arguments"


def test_o2a_drops_empty_text_and_empty_messages():
    out = o2a(
        {
            "messages": [
                {"role": "user", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "real"}]},
                {"role": "assistant", "content": None},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "more"},
            ]
        }
    )
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "real"}, {"type": "text", "text": "more"}]}
    ]


def test_o2a_images_data_url_and_https():
    out = o2a(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AA=="}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/a.png", "detail": "high"},
                        },
                    ],
                }
            ]
        }
    )
    assert out["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/AA=="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
    ]
    with pytest.raises(BadRequest) as err:
        o2a(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                    }
                ]
            }
        )
    assert err.value.param == "messages[0].content[0].image_url.url"


def test_o2a_tools_choice_parallel_stop_temperature_user():
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    base: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": tools}
    out = o2a(
        {
            **base,
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "stop": "END",
            "temperature": 1.7,
            "user": "u1",
            "seed": 3,
        }
    )
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object"}, "description": "d"}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["stop_sequences"] == ["END"]
    assert out["temperature"] == 1
    assert out["metadata"] == {"user_id": "u1"}
    assert "seed" not in out
    assert o2a({**base, "parallel_tool_calls": False})["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert o2a({**base, "tool_choice": {"type": "function", "function": {"name": "f"}}})["tool_choice"] == {
        "type": "tool",
        "name": "f",
    }
    assert o2a({**base, "tool_choice": "none"})["tool_choice"] == {"type": "none"}
    assert o2a({**base, "temperature": -1})["temperature"] == 0
    assert o2a({**base, "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
            "response_format.type",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_o2a_refuses_what_cannot_be_carried_naming_the_field(extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(BadRequest) as err:
        o2a(body)
    assert err.value.param == param


def test_o2a_json_object_response_format_is_dropped():
    out = o2a(
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "n": 1}
    )
    assert "response_format" not in out


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_a2o2a_keeps_meaning():
    original = {
        "model": "claude-sonnet",
        "max_tokens": 300,
        "system": "Be brief.",
        "temperature": 0.5,
        "stop_sequences": ["STOP"],
        "metadata": {"user_id": "u-9"},
        "tools": [
            {
                "name": "Bash",
                "description": "shell",
                "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            }
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "list"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "ok"},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"cmd": "ls"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"},
                    },
                    {"type": "text", "text": "and this"},
                ],
            },
        ],
    }
    back = o2a(a2o(original))
    assert back["system"] == "Be brief."
    assert back["temperature"] == 0.5
    assert back["stop_sequences"] == ["STOP"]
    assert "metadata" not in back  # the client's user id is not carried to a third party
    assert back["max_tokens"] == 300
    assert back["tools"] == [
        {"name": "Bash", "description": "shell", "input_schema": original["tools"][0]["input_schema"]}
    ]
    assert back["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert back["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "list"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "ok"},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"cmd": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}},
                {"type": "text", "text": "and this"},
            ],
        },
    ]


def test_a2o_plain_text_document_becomes_text_and_redacted_thinking_is_dropped():
    msgs = a2o(
        {
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "DOC"},
                        }
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "redacted_thinking", "data": "xxx"}, {"type": "text", "text": "ok"}],
                },
            ],
        }
    )["messages"]
    assert msgs[0] == {"role": "user", "content": "DOC"}
    assert msgs[1] == {"role": "assistant", "content": "ok", "reasoning_content": ""}


def test_a2o_tool_choice_without_tools_is_dropped():
    out = a2o(
        {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}}
    )
    assert "tool_choice" not in out and "tools" not in out
