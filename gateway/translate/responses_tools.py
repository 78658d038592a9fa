"""Responses API tools <-> Chat Completions functions, and the map that restores their identities.

A Responses client can declare three kinds of callable tools: ``function``, ``custom`` (freeform
text input, e.g. Codex's ``apply_patch``) and ``namespace`` (a group of functions, e.g. one MCP
server). Chat Completions upstreams only know flat functions, so every callable tool becomes one
function with an upstream-safe name, and ``ResponsesToolMap`` turns the upstream's calls back into
``function_call`` (with ``namespace``) or ``custom_tool_call`` items.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from gateway.errors import BadRequest
from gateway.translate.fields import need_dict, need_list
from gateway.translate.names import MAX_TOOL_NAME_LEN, ToolNameMap

__all__ = ["HOSTED_TOOL_TYPES", "ResponsesToolMap", "ToolIdentity"]

# Tools the upstream cannot run (OpenAI runs them server-side, or they are OpenAI-only built-ins):
# dropped, and listed in docs/translation.md.
HOSTED_TOOL_TYPES = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "web_search_2025_08_26",
        "file_search",
        "code_interpreter",
        "image_generation",
        "mcp",
        "computer_use_preview",
        "computer_use",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
    }
)

_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


class ToolIdentity(NamedTuple):
    kind: str  # "function" | "custom"
    name: str
    namespace: str | None


def _joined(namespace: str, name: str) -> str:
    # Codex's MCP namespaces already end in "__" (mcp__server__); do not double the separator.
    return f"{namespace}{name}" if namespace.endswith("_") else f"{namespace}__{name}"


class ResponsesToolMap:
    """Which upstream function stands for which client tool; built by the request translator.

    Also carries two request facts the proxy may want: ``prompt_cache_key`` (for an upstream that
    caches by key; never log it) and ``compaction_requested`` (the input held a
    ``compaction_trigger`` item, which only OpenAI's own backend can honour).
    """

    __slots__ = ("_by_upstream", "_names", "_to_upstream", "compaction_requested", "prompt_cache_key")

    def __init__(self) -> None:
        self._names = ToolNameMap()
        self._by_upstream: dict[str, ToolIdentity] = {}
        self._to_upstream: dict[tuple[str | None, str], str] = {}
        self.compaction_requested = False
        self.prompt_cache_key: str | None = None

    def __repr__(self) -> str:  # never print the cache key
        return f"ResponsesToolMap(tools={len(self._by_upstream)})"

    def add(self, kind: str, name: str, namespace: str | None = None) -> str:
        """Register a client tool; returns its upstream function name (stable for a given tool list)."""
        key = (namespace, name)
        known = self._to_upstream.get(key)
        if known is not None:
            if self._by_upstream[known].kind != kind:  # same name declared as function and custom
                self._by_upstream[known] = ToolIdentity(kind, name, namespace)
            return known
        candidate = self._names.to_upstream(_joined(namespace, name) if namespace else name)
        if candidate in self._by_upstream:  # "a__b" plain vs tool "b" in namespace "a"
            digest = hashlib.sha256(f"{namespace}\x00{name}".encode()).hexdigest()[:8]
            candidate = f"{candidate[: MAX_TOOL_NAME_LEN - 9]}_{digest}"
        self._to_upstream[key] = candidate
        self._by_upstream[candidate] = ToolIdentity(kind, name, namespace)
        return candidate

    def upstream_name(self, name: str, namespace: str | None = None, *, kind: str = "function") -> str:
        """The upstream name for a tool seen in history (registered on the fly if not declared)."""
        known = self._to_upstream.get((namespace, name))
        return known if known is not None else self.add(kind, name, namespace)

    def resolve(self, upstream_name: str) -> ToolIdentity:
        """The client tool an upstream call names; an unknown name is a plain function of that name."""
        return self._by_upstream.get(upstream_name, ToolIdentity("function", upstream_name, None))

    def __len__(self) -> int:
        return len(self._by_upstream)

    # -- tool definitions ---------------------------------------------------------------------------

    def chat_tools(self, tools: Any, field: str = "tools") -> list[dict[str, Any]]:
        """Responses ``tools`` -> Chat ``tools`` (hosted tools dropped, namespaces flattened)."""
        out: list[dict[str, Any]] = []
        for i, tool in enumerate(need_list(tools, field)):
            out.extend(self._chat_tool(need_dict(tool, f"{field}[{i}]"), f"{field}[{i}]", None, ""))
        return out

    def _chat_tool(
        self, tool: dict[str, Any], field: str, namespace: str | None, prefix: str
    ) -> list[dict[str, Any]]:
        kind = tool.get("type")
        if kind == "namespace":
            if namespace is not None:
                raise BadRequest(f"{field}.type: namespaces cannot be nested", param=f"{field}.type")
            ns = _need_name(tool, field)
            described = str(tool.get("description") or "")
            out: list[dict[str, Any]] = []
            for j, inner in enumerate(need_list(tool.get("tools"), f"{field}.tools")):
                inner_field = f"{field}.tools[{j}]"
                out.extend(self._chat_tool(need_dict(inner, inner_field), inner_field, ns, described))
            return out
        if kind == "function":
            name = _need_name(tool, field)
            parameters = tool.get("parameters")
            function: dict[str, Any] = {
                "name": self.add("function", name, namespace),
                "parameters": parameters if isinstance(parameters, dict) and parameters else _EMPTY_SCHEMA,
            }
            description = _describe(prefix, tool.get("description"))
            if description:
                function["description"] = description
            return [{"type": "function", "function": function}]
        if kind == "custom":
            name = _need_name(tool, field)
            return [
                {
                    "type": "function",
                    "function": {
                        "name": self.add("custom", name, namespace),
                        "description": _custom_description(prefix, tool),
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "input": {"type": "string", "description": "The raw tool input (free text)."}
                            },
                            "required": ["input"],
                            "additionalProperties": False,
                        },
                    },
                }
            ]
        if isinstance(kind, str) and kind in HOSTED_TOOL_TYPES:
            return []
        raise BadRequest(f"{field}.type: unknown tool type {kind!r}", param=f"{field}.type")

    def chat_tool_choice(self, choice: Any) -> Any:
        """Responses ``tool_choice`` -> Chat ``tool_choice``; None when it should be left out."""
        if choice is None or choice in ("auto", "none", "required"):
            return choice
        if not isinstance(choice, dict):
            raise BadRequest("tool_choice: must be none, auto, required or an object", param="tool_choice")
        kind = choice.get("type")
        if kind in ("function", "custom"):
            name = choice.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest("tool_choice.name: required", param="tool_choice.name")
            namespace = choice.get("namespace") if isinstance(choice.get("namespace"), str) else None
            upstream = self._to_upstream.get((namespace, name))
            if upstream is None:
                raise BadRequest("tool_choice.name: no tool of that name in tools", param="tool_choice.name")
            return {"type": "function", "function": {"name": upstream}}
        if kind == "allowed_tools":
            # The allow-list cannot be expressed in Chat; its mode can.
            return "required" if choice.get("mode") == "required" else "auto"
        return "auto"  # a hosted tool (dropped) or mcp: let the model choose among what is left


def _need_name(tool: dict[str, Any], field: str) -> str:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{field}.name: required", param=f"{field}.name")
    return name


def _describe(prefix: str, description: Any) -> str:
    text = str(description or "")
    return f"{prefix}\n\n{text}" if prefix and text else prefix or text


def _custom_description(prefix: str, tool: dict[str, Any]) -> str:
    text = _describe(prefix, tool.get("description"))
    note = "Put the whole tool input, as free text (not JSON), in the `input` argument."
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar" and fmt.get("definition"):
        syntax = str(fmt.get("syntax") or "lark")
        note += f" The input must match this {syntax} grammar:\n{fmt['definition']}"
    return f"{text}\n\n{note}" if text else note
