"""Responses request -> Chat request: items, tools, controls, refusals, Codex-shaped turns, and the
composition with ``openai_to_anthropic_request`` for Anthropic-format upstreams."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from gateway.errors import BadRequest
from gateway.models import Capabilities
from gateway.translate import openai_to_anthropic_request
from gateway.translate.responses_request import responses_to_chat_request
from gateway.translate.responses_tools import ResponsesToolMap, ToolIdentity
from tests.codex_fixtures import APPLY_PATCH_GRAMMAR, FIRST_TURN, PATCH, second_turn


def r2c(body: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], ResponsesToolMap]:
    return responses_to_chat_request(
        {"model": "m", **body}, upstream_model="deepseek-chat", max_tokens=8192, **kw
    )


def msgs(body: dict[str, Any]) -> list[dict[str, Any]]:
    return r2c(body)[0]["messages"]


# --- input -----------------------------------------------------------------------------------------


def test_string_input_and_instructions():
    out, _ = r2c({"input": "hello", "instructions": "be brief"})
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert out["model"] == "deepseek-chat" and out["max_tokens"] == 8192
    assert "stream" not in out


def test_message_roles_and_parts():
    out = msgs(
        {
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
                {"role": "system", "content": "sys"},  # EasyInputMessage: no type
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                },
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "see"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                    ],
                },
            ]
        }
    )
    assert msgs(
        {
            "input": [
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                {"role": "user", "content": "x"},
            ]
        }
    )[0] == {
        "role": "assistant",
        "content": "no",
    }
    assert out == [
        {"role": "system", "content": "dev\n\nsys"},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ],
        },
    ]


def test_consecutive_calls_merge_into_one_assistant_turn_and_outputs_follow():
    out = msgs(
        {
            "input": [
                {"role": "user", "content": "go"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Running."}],
                },
                {"type": "function_call", "name": "a", "arguments": '{"x":1}', "call_id": "c1"},
                {"type": "function_call", "name": "b", "arguments": "{}", "call_id": "c2"},
                {"type": "function_call_output", "call_id": "c2", "output": "B"},
                {"type": "function_call_output", "call_id": "c1", "output": "A"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Done."}],
                },
            ]
        }
    )
    assert out[1] == {
        "role": "assistant",
        "content": "Running.",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
        ],
        "reasoning_content": "",
    }
    # Chat needs the results in the order of the calls; the client may answer in any order.
    assert out[2:4] == [
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B"},
    ]
    assert out[4] == {"role": "assistant", "content": "Done."}


def test_reasoning_summary_rides_on_the_next_assistant_turn_and_encrypted_content_never_leaves():
    out = msgs(
        {
            "input": [
                {"role": "user", "content": "go"},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [
                        {"type": "summary_text", "text": "plan A"},
                        {"type": "summary_text", "text": "plan B"},
                    ],
                    "encrypted_content": "SECRET-BLOB",
                },
                {"type": "function_call", "name": "a", "arguments": "{}", "call_id": "c1"},
                {"type": "function_call_output", "call_id": "c1", "output": "A"},
            ]
        }
    )
    assert out[1]["reasoning_content"] == "plan A\n\nplan B"
    assert "SECRET-BLOB" not in json.dumps(out)


def test_reasoning_before_a_user_message_is_dropped():
    out = msgs(
        {
            "input": [
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "x"}]},
                {"role": "user", "content": "hi"},
            ]
        }
    )
    assert out == [{"role": "user", "content": "hi"}]


def test_custom_tool_call_becomes_a_function_call_with_one_input_argument():
    out, tools = r2c(
        {
            "input": [
                {"role": "user", "content": "patch it"},
                {"type": "custom_tool_call", "name": "apply_patch", "input": PATCH, "call_id": "p1"},
                {"type": "custom_tool_call_output", "call_id": "p1", "output": "Success."},
            ],
            "tools": [{"type": "custom", "name": "apply_patch", "description": "edit files"}],
        }
    )
    call = out["messages"][1]["tool_calls"][0]
    assert call["function"]["name"] == "apply_patch"
    assert json.loads(call["function"]["arguments"]) == {"input": PATCH}
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "p1", "content": "Success."}
    assert tools.resolve("apply_patch") == ToolIdentity("custom", "apply_patch", None)


def test_tool_output_as_content_items_images_follow_in_a_user_message():
    out = msgs(
        {
            "input": [
                {"role": "user", "content": "look"},
                {"type": "function_call", "name": "view_image", "arguments": "{}", "call_id": "v1"},
                {
                    "type": "function_call_output",
                    "call_id": "v1",
                    "output": [
                        {"type": "input_text", "text": "here"},
                        {"type": "input_image", "image_url": "data:image/png;base64,BBBB"},
                    ],
                },
            ]
        }
    )
    assert out[2] == {"role": "tool", "tool_call_id": "v1", "content": "here"}
    assert out[3] == {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}],
    }


def test_unanswered_call_gets_a_placeholder_and_a_late_answer_becomes_words():
    out = msgs(
        {
            "input": [
                {"role": "user", "content": "go"},
                {"type": "function_call", "name": "a", "arguments": "{}", "call_id": "c1"},
                {"role": "user", "content": "stop that"},
                {"type": "function_call_output", "call_id": "c1", "output": "late"},
            ]
        }
    )
    assert out[2] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "(no output was recorded for this call)",
    }
    assert out[3] == {"role": "user", "content": "stop that"}
    assert out[4] == {"role": "user", "content": "Result of tool call c1:\nlate"}


def test_hosted_and_openai_only_items_are_dropped():
    out, tools = r2c(
        {
            "input": [
                {"role": "user", "content": "hi"},
                {
                    "type": "web_search_call",
                    "status": "completed",
                    "action": {"type": "search", "query": "q"},
                },
                {"type": "compaction", "encrypted_content": "blob"},
                {"type": "compaction_summary", "encrypted_content": "blob"},
                {"type": "tool_search_call", "call_id": "t", "execution": "client", "arguments": {}},
                {
                    "type": "tool_search_output",
                    "call_id": "t",
                    "status": "completed",
                    "execution": "client",
                    "tools": [],
                },
                {"type": "image_generation_call", "status": "completed", "result": "..."},
            ]
        }
    )
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    assert tools.compaction_requested is False
    _, tools = r2c({"input": [{"role": "user", "content": "hi"}, {"type": "compaction_trigger"}]})
    assert tools.compaction_requested is True


def test_local_shell_call_history_is_kept_as_a_function_call():
    out = msgs(
        {
            "input": [
                {"role": "user", "content": "ls"},
                {
                    "type": "local_shell_call",
                    "call_id": "s1",
                    "status": "completed",
                    "action": {"type": "exec", "command": ["ls"]},
                },
                {"type": "function_call_output", "call_id": "s1", "output": "a.txt"},
            ]
        }
    )
    assert out[1]["tool_calls"][0]["function"] == {
        "name": "local_shell",
        "arguments": '{"type": "exec", "command": ["ls"]}',
    }
    assert out[2]["content"] == "a.txt"


# --- tools -----------------------------------------------------------------------------------------


def test_tools_function_custom_namespace_hosted():
    out, tools = r2c(
        {
            "input": "hi",
            "tools": [
                {
                    "type": "function",
                    "name": "f",
                    "description": "F",
                    "strict": True,
                    "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
                },
                {"type": "function", "name": "bare"},
                {
                    "type": "custom",
                    "name": "apply_patch",
                    "description": "Patch.",
                    "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_GRAMMAR},
                },
                {"type": "custom", "name": "free"},
                {
                    "type": "namespace",
                    "name": "mcp__gh__",
                    "description": "GitHub",
                    "tools": [{"type": "function", "name": "get", "description": "Get"}],
                },
                {
                    "type": "namespace",
                    "name": "docs",
                    "description": "",
                    "tools": [{"type": "custom", "name": "q"}],
                },
                {"type": "web_search", "external_web_access": False},
                {"type": "file_search", "vector_store_ids": ["v"]},
                {"type": "image_generation", "output_format": "png"},
                {"type": "tool_search", "execution": "client", "description": "", "parameters": {}},
            ],
        }
    )
    names = [t["function"]["name"] for t in out["tools"]]
    assert names == ["f", "bare", "apply_patch", "free", "mcp__gh__get", "docs__q"]
    f = out["tools"][0]["function"]
    assert f == {
        "name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
        "description": "F",
    }
    assert out["tools"][1]["function"]["parameters"] == {"type": "object", "properties": {}}
    patch = out["tools"][2]["function"]
    assert patch["parameters"]["required"] == ["input"]
    assert patch["description"].startswith("Patch.") and APPLY_PATCH_GRAMMAR in patch["description"]
    assert out["tools"][4]["function"]["description"] == "GitHub\n\nGet"
    assert tools.resolve("mcp__gh__get") == ToolIdentity("function", "get", "mcp__gh__")
    assert tools.resolve("docs__q") == ToolIdentity("custom", "q", "docs")
    assert tools.resolve("never_declared") == ToolIdentity("function", "never_declared", None)


def test_namespaced_call_in_history_uses_the_flattened_name():
    out, _ = r2c(
        {
            "input": [
                {"role": "user", "content": "x"},
                {
                    "type": "function_call",
                    "name": "get",
                    "namespace": "mcp__gh__",
                    "arguments": "{}",
                    "call_id": "c",
                },
                {"type": "function_call_output", "call_id": "c", "output": "y"},
            ],
            "tools": [
                {
                    "type": "namespace",
                    "name": "mcp__gh__",
                    "description": "",
                    "tools": [{"type": "function", "name": "get"}],
                }
            ],
        }
    )
    assert out["messages"][1]["tool_calls"][0]["function"]["name"] == "mcp__gh__get"


def test_flattened_names_are_safe_unique_and_reversible():
    long_ns = "mcp__a_very_long_server_name_that_keeps_going_and_going__"
    declared = [
        {"type": "function", "name": "a__b"},
        {"type": "namespace", "name": "a", "description": "", "tools": [{"type": "function", "name": "b"}]},
        {
            "type": "namespace",
            "name": long_ns,
            "description": "",
            "tools": [{"type": "function", "name": "tool.with.dots"}],
        },
    ]
    out, tools = r2c({"input": "x", "tools": declared})
    names = [t["function"]["name"] for t in out["tools"]]
    assert len(set(names)) == 3
    for name in names:
        assert len(name) <= 64 and all(c.isalnum() or c in "_-" for c in name)
    assert tools.resolve(names[0]) == ToolIdentity("function", "a__b", None)
    assert tools.resolve(names[1]) == ToolIdentity("function", "b", "a")
    assert tools.resolve(names[2]) == ToolIdentity("function", "tool.with.dots", long_ns)
    # The same tool list always gives the same names (history and tools agree across turns).
    again, _ = r2c({"input": "x", "tools": declared})
    assert [t["function"]["name"] for t in again["tools"]] == names


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
        (
            {"type": "custom", "name": "apply_patch"},
            {"type": "function", "function": {"name": "apply_patch"}},
        ),
        (
            {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "f"}]},
            "required",
        ),
        ({"type": "allowed_tools", "mode": "auto", "tools": []}, "auto"),
        ({"type": "web_search"}, "auto"),
    ],
)
def test_tool_choice(choice: Any, expected: Any):
    out, _ = r2c(
        {
            "input": "x",
            "tools": [{"type": "function", "name": "f"}, {"type": "custom", "name": "apply_patch"}],
            "tool_choice": choice,
            "parallel_tool_calls": False,
        }
    )
    assert out["tool_choice"] == expected
    assert out["parallel_tool_calls"] is False


def test_only_hosted_tools_means_no_tools_upstream():
    out, _ = r2c(
        {"input": "x", "tools": [{"type": "web_search"}], "tool_choice": "auto", "parallel_tool_calls": True}
    )
    assert "tools" not in out and "tool_choice" not in out and "parallel_tool_calls" not in out


# --- controls --------------------------------------------------------------------------------------


def test_controls_mapped():
    out, tools = r2c(
        {
            "input": "x",
            "stream": True,
            "max_output_tokens": 100,
            "temperature": 0.2,
            "top_p": 0.9,
            "reasoning": {"effort": "high", "summary": "auto"},
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "out",
                    "schema": {"type": "object"},
                    "strict": True,
                },
                "verbosity": "low",
            },
            "user": "u1",
            "prompt_cache_key": "cache-key-1",
            "metadata": {"a": "b"},
            "client_metadata": {"c": "d"},
            "include": ["reasoning.encrypted_content"],
            "store": False,
            "truncation": "auto",
            "service_tier": "auto",
            "stream_options": {"include_obfuscation": False},
            "safety_identifier": "s",
            "max_tool_calls": 3,
        }
    )
    assert out == {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
        "user": "u1",
    }
    assert tools.prompt_cache_key == "cache-key-1"
    assert "cache-key-1" not in repr(tools)
    assert r2c({"input": "x", "max_output_tokens": 10**9})[0]["max_tokens"] == 8192
    assert r2c({"input": "x", "text": {"format": {"type": "json_object"}}})[0]["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in r2c({"input": "x", "text": {"format": {"type": "text"}}})[0]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "mystery"}]}, "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].file_id",
        ),
        ({"input": [{"type": "function_call", "name": "a", "arguments": "{}"}]}, "input[0].call_id"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [{"type": "brand_new_tool"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice.name",
        ),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"input": []}, "input"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
    ],
)
def test_refusals_name_the_field(extra: dict[str, Any], param: str):
    body = {"input": "x", **extra}
    with pytest.raises(BadRequest) as err:
        r2c(body)
    assert err.value.param == param
    assert param.split("[")[0].split(".")[0] in err.value.message


def test_mid_conversation_developer_messages_fold_into_the_user_turn():
    out = msgs(
        {
            "instructions": "base",
            "input": [
                {"role": "developer", "content": "perms"},
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "ok"},
                {"role": "developer", "content": "approval mode changed"},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "two"},
                        {"type": "input_image", "image_url": "https://x/y.png"},
                    ],
                },
                {"role": "assistant", "content": "done"},
                {"role": "developer", "content": "at the end"},
            ],
        }
    )
    assert out[0] == {"role": "system", "content": "base\n\nperms"}
    assert out[3]["content"][0] == {
        "type": "text",
        "text": "<system-reminder>\napproval mode changed\n</system-reminder>",
    }
    assert out[4] == {"role": "assistant", "content": "done"}
    assert out[5] == {"role": "user", "content": "<system-reminder>\nat the end\n</system-reminder>"}
    assert [m["role"] for m in out].count("system") == 1


@pytest.mark.parametrize(
    ("reasoning", "style", "expected"),
    [
        ({"effort": "high", "summary": "auto"}, "openai", {"reasoning_effort": "high"}),
        ({"effort": "xhigh"}, "openai", {"reasoning_effort": "high"}),
        ({"effort": "minimal"}, "openai", {"reasoning_effort": "low"}),
        ({"effort": "none"}, "openai", {}),
        ({"effort": "low"}, "deepseek", {"thinking": {"type": "enabled"}, "reasoning_effort": "low"}),
        ({"effort": "none"}, "deepseek", {"thinking": {"type": "disabled"}}),
        ({"summary": "auto"}, "deepseek", {}),  # what Codex sends by default: the model's own default
        ({"effort": "high"}, "none", {}),
    ],
)
def test_reasoning_effort_by_upstream_capability(reasoning: Any, style: Any, expected: dict[str, Any]):
    out, _ = r2c({"input": "x", "reasoning": reasoning}, capabilities=Capabilities(reasoning=style))
    got = {k: out[k] for k in ("reasoning_effort", "thinking") if k in out}
    assert got == expected


def test_structured_output_by_upstream_capability():
    text = {
        "format": {
            "type": "json_schema",
            "name": "out",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        }
    }
    out, _ = r2c(
        {"input": "x", "instructions": "base", "text": text},
        capabilities=Capabilities(structured_output="json_object"),
    )
    assert out["response_format"] == {"type": "json_object"}
    assert out["messages"][0]["content"].startswith(
        "base\n\nRespond with a single JSON object that matches this JSON schema:"
    )
    out, _ = r2c({"input": "x", "text": text}, capabilities=Capabilities(structured_output="none"))
    assert "response_format" not in out and "JSON schema" in out["messages"][0]["content"]


def test_stateless_message_says_what_to_do():
    with pytest.raises(BadRequest) as err:
        r2c({"input": "x", "previous_response_id": "resp_1"})
    assert "keeps no conversations" in err.value.message and "store: false" in err.value.message


# --- Codex-shaped turns ----------------------------------------------------------------------------


def test_codex_first_turn():
    out, tools = responses_to_chat_request(FIRST_TURN, upstream_model="deepseek-chat", max_tokens=8192)
    system = out["messages"][0]
    assert system["role"] == "system" and system["content"].startswith(FIRST_TURN["instructions"] + "\n\n")
    assert "<permissions instructions>" in system["content"]
    assert [m["role"] for m in out["messages"]] == ["system", "user", "user"]
    names = [t["function"]["name"] for t in out["tools"]]
    assert len(names) == 10 + 1 + 5  # functions, apply_patch, the namespace's five; web_search dropped
    assert "apply_patch" in names and "mcp__github__get_issue" in names and "web_search" not in names
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is True and out["stream"] is True
    assert "reasoning_effort" not in out  # Codex sent only reasoning.summary
    assert tools.prompt_cache_key == FIRST_TURN["prompt_cache_key"]
    assert FIRST_TURN["prompt_cache_key"] not in json.dumps(out)
    assert tools.resolve("mcp__github__get_file_contents") == ToolIdentity(
        "function", "get_file_contents", "mcp__github__"
    )


def test_codex_second_turn():
    out, _ = responses_to_chat_request(second_turn(), upstream_model="deepseek-chat", max_tokens=8192)
    m = out["messages"]
    assert [x["role"] for x in m] == [
        "system",
        "user",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
    ]
    assert m[3]["content"] == "Running the tests first."
    assert m[3]["reasoning_content"] == "**Locating the test**\n\nRun pytest first."
    assert [c["function"]["name"] for c in m[3]["tool_calls"]] == ["exec_command", "mcp__github__get_issue"]
    assert m[4] == {"role": "tool", "tool_call_id": "call_exec_1", "content": "1 failed: test_app expected 2"}
    assert m[5] == {"role": "tool", "tool_call_id": "call_issue_2", "content": "Issue 7: app returns 1"}
    assert m[6]["reasoning_content"] == ""  # DeepSeek's thinking mode needs the key on tool turns
    assert json.loads(m[6]["tool_calls"][0]["function"]["arguments"]) == {"input": PATCH}
    assert m[7]["content"] == "Success. Updated src/app.py"
    assert "gAAAA" not in json.dumps(out)


def test_codex_turns_compose_into_a_valid_anthropic_request():
    for body in (FIRST_TURN, second_turn()):
        chat, _ = responses_to_chat_request(body, upstream_model="x", max_tokens=4096)
        out = openai_to_anthropic_request(chat, upstream_model="claude-x", max_tokens=4096)
        assert out["system"].startswith(FIRST_TURN["instructions"])
        roles = [m["role"] for m in out["messages"]]
        assert all(a != b for a, b in itertools.pairwise(roles)), roles  # alternating
        assert roles[0] == "user"
        names = {t["name"] for t in out["tools"]}
        assert {"exec_command", "apply_patch", "mcp__github__get_issue"} <= names
        uses = [b for m in out["messages"] for b in m["content"] if b["type"] == "tool_use"]
        results = [b for m in out["messages"] for b in m["content"] if b["type"] == "tool_result"]
        assert [u["id"] for u in uses] == [r["tool_use_id"] for r in results]
        if uses:
            assert uses[-1]["input"] == {"input": PATCH}
