"""Request bodies shaped like the ones Codex CLI sends (codex-rs ResponsesApiRequest, ToolSpec,
ResponseItem; see /work/notes/codex.md): a first turn and a second turn with tool history."""

from __future__ import annotations

import copy
from typing import Any

APPLY_PATCH_GRAMMAR = """start: begin_patch hunk+ end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?

hunk: add_hunk | delete_hunk | update_hunk
add_hunk: "*** Add File: " filename LF add_line+
delete_hunk: "*** Delete File: " filename LF
update_hunk: "*** Update File: " filename LF change_move? change?

filename: /(.+)/
add_line: "+" /(.*)/ LF -> line

change_move: "*** Move to: " filename LF
change: (change_context | change_line)+ eof_line?
change_context: ("@@" | "@@ " /(.+)/) LF
change_line: ("+" | "-" | " ") /(.*)/ LF
eof_line: "*** End of File" LF

%import common.LF
"""


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "description": description,
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        },
    }


_S = {"type": "string"}
_N = {"type": "number"}

CODEX_TOOLS: list[dict[str, Any]] = [
    _fn(
        "exec_command",
        "Runs a command in a PTY, returning output or a session ID for ongoing interaction.",
        {"cmd": _S, "workdir": _S, "yield_time_ms": _N, "max_output_tokens": _N, "tty": {"type": "boolean"}},
        ["cmd"],
    ),
    _fn(
        "write_stdin",
        "Writes characters to an existing unified exec session and returns recent output.",
        {"session_id": _N, "chars": _S, "yield_time_ms": _N},
        ["session_id"],
    ),
    _fn(
        "update_plan",
        "Updates the task plan.",
        {
            "explanation": _S,
            "plan": {"type": "array", "items": {"type": "object", "properties": {"step": _S, "status": _S}}},
        },
        ["plan"],
    ),
    _fn(
        "request_user_input",
        "Ask the user up to 3 short questions.",
        {"questions": {"type": "array"}},
        ["questions"],
    ),
    _fn("view_image", "View a local image from the filesystem.", {"path": _S}, ["path"]),
    _fn("spawn_agent", "Spawn a sub-agent.", {"message": _S, "agent_type": _S}, ["message"]),
    _fn("send_input", "Send a message to an agent.", {"id": _S, "message": _S}, ["id", "message"]),
    _fn("resume_agent", "Resume a closed agent.", {"id": _S}, ["id"]),
    _fn("wait_agent", "Wait for agents to finish.", {"ids": {"type": "array", "items": _S}}, ["ids"]),
    _fn("close_agent", "Close an agent.", {"id": _S}, ["id"]),
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool, so do not wrap the patch in JSON.",
        "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_GRAMMAR},
    },
    {"type": "web_search", "external_web_access": False},
    {
        "type": "namespace",
        "name": "mcp__github__",
        "description": "Tools in the mcp__github__ namespace.",
        "tools": [
            _fn(
                "get_issue",
                "Get an issue.",
                {"owner": _S, "repo": _S, "number": _N},
                ["owner", "repo", "number"],
            ),
            _fn("list_issues", "List issues.", {"owner": _S, "repo": _S}, ["owner", "repo"]),
            _fn(
                "create_issue",
                "Create an issue.",
                {"owner": _S, "repo": _S, "title": _S},
                ["owner", "repo", "title"],
            ),
            _fn("search_code", "Search code.", {"q": _S}, ["q"]),
            {**_fn("get_file_contents", "Read a file.", {"path": _S}, ["path"]), "defer_loading": True},
        ],
    },
]

INSTRUCTIONS = "You are Codex, a coding agent based on GPT-5. You and the user share the same workspace."

FIRST_TURN: dict[str, Any] = {
    "model": "deepseek-chat",
    "instructions": INSTRUCTIONS,
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [
                {
                    "type": "input_text",
                    "text": "<permissions instructions>sandbox: workspace-write</permissions instructions>",
                }
            ],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {
                    "type": "input_text",
                    "text": "# AGENTS.md instructions for /work/demo\n\n<INSTRUCTIONS>Be brief.</INSTRUCTIONS>",
                },
                {
                    "type": "input_text",
                    "text": "<environment_context>\n  <cwd>/work/demo</cwd>\n  <shell>bash</shell>\n</environment_context>",
                },
            ],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Fix the failing test."}],
        },
    ],
    "tools": CODEX_TOOLS,
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a1b2-c3d4-7e8f-9a0b-c1d2e3f4a5b6",
    "client_metadata": {"x-codex-turn-id": "turn-1"},
}

PATCH = "*** Begin Patch\n*** Update File: src/app.py\n@@\n-    return 1\n+    return 2\n*** End Patch\n"


def second_turn() -> dict[str, Any]:
    """The first turn plus what the model did: reasoning, a call of each kind, their outputs."""
    body = copy.deepcopy(FIRST_TURN)
    body["input"] += [
        {
            "type": "reasoning",
            "id": "rs_0",
            "summary": [{"type": "summary_text", "text": "**Locating the test**\n\nRun pytest first."}],
            "encrypted_content": "gAAAAABo-opaque-to-everyone-but-openai",
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Running the tests first."}],
            "phase": "commentary",
        },
        {
            "type": "function_call",
            "name": "exec_command",
            "arguments": '{"cmd":"pytest -q","workdir":"/work/demo"}',
            "call_id": "call_exec_1",
        },
        {
            "type": "function_call",
            "name": "get_issue",
            "namespace": "mcp__github__",
            "arguments": '{"owner":"o","repo":"r","number":7}',
            "call_id": "call_issue_2",
        },
        {"type": "function_call_output", "call_id": "call_exec_1", "output": "1 failed: test_app expected 2"},
        {
            "type": "function_call_output",
            "call_id": "call_issue_2",
            "output": [{"type": "input_text", "text": "Issue 7: app returns 1"}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {
            "type": "custom_tool_call",
            "name": "apply_patch",
            "input": PATCH,
            "call_id": "call_patch_3",
            "status": "completed",
        },
        {
            "type": "custom_tool_call_output",
            "call_id": "call_patch_3",
            "output": "Success. Updated src/app.py",
        },
        {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "pytest"}},
    ]
    return body
