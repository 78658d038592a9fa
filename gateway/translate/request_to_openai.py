"""Anthropic Messages request -> OpenAI chat request, for an OpenAI-format upstream such as DeepSeek."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import BadRequest
from gateway.models import Capabilities
from gateway.translate.fields import cap_max_tokens, need_dict, need_list, number
from gateway.translate.names import ToolNameMap
from gateway.translate.thinking import openai_reasoning

__all__ = ["DOCUMENT_OMITTED", "MAX_STOP_SEQUENCES", "anthropic_to_openai_request"]

MAX_STOP_SEQUENCES = 4  # OpenAI's limit on `stop`
DOCUMENT_OMITTED = "[A document was attached here; this model cannot read it, so it was left out.]"


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    parts: list[str] = []
    for i, block in enumerate(need_list(system, "system")):
        block = need_dict(block, f"system[{i}]")
        if block.get("type") != "text":
            raise BadRequest(f"system[{i}].type: only text blocks are supported", param=f"system[{i}].type")
        if block.get("text"):
            parts.append(str(block["text"]))
    return "\n\n".join(parts)


def _image_part(block: dict[str, Any], field: str) -> dict[str, Any]:
    source = need_dict(block.get("source"), f"{field}.source")
    kind = source.get("type")
    if kind == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif kind == "url":
        url = str(source.get("url", ""))
    else:
        raise BadRequest(
            f"{field}.source.type: only base64 and url images are supported", param=f"{field}.source.type"
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _user_part(block: dict[str, Any], field: str) -> dict[str, Any] | None:
    """One Anthropic user block (not tool_result) as an OpenAI content part; None drops it."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text") or ""
        return {"type": "text", "text": text} if text else None
    if kind == "image":
        return _image_part(block, field)
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            return {"type": "text", "text": source["data"]}
        # A PDF or file the upstream cannot read: say so in place, so the model (and the user through
        # it) knows a document was there, instead of refusing the whole conversation.
        return {"type": "text", "text": DOCUMENT_OMITTED}
    if kind == "search_result":
        texts = [str(c.get("text", "")) for c in block.get("content") or [] if isinstance(c, dict)]
        return {"type": "text", "text": "\n".join(t for t in texts if t)} if any(texts) else None
    # thinking on a user turn, tool_reference, container uploads, and block types newer than this
    # gateway: nothing the upstream could take (docs/translation.md).
    return None


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # Text-only content goes as a plain string: several OpenAI-compatible upstreams reject part lists.
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _tool_result(block: dict[str, Any], field: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool_result -> (tool message, image parts that must ride in the following user message)."""
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise BadRequest(f"{field}.tool_use_id: required", param=f"{field}.tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, sub in enumerate(content):
            sub = need_dict(sub, f"{field}.content[{j}]")
            part = _user_part(sub, f"{field}.content[{j}]")
            if part is None:
                continue
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images.append(part)
    elif content is not None:
        raise BadRequest(f"{field}.content: must be a string or an array", param=f"{field}.content")
    text = "\n".join(t for t in texts if t)
    if block.get("is_error"):
        text = f"Error: {text}" if text else "Error:"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images


def _user_messages(content: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(need_list(content, f"{field}.content")):
        block = need_dict(block, f"{field}.content[{j}]")
        if block.get("type") == "tool_result":
            message, moved = _tool_result(block, f"{field}.content[{j}]")
            tool_messages.append(message)
            images.extend(moved)
        else:
            part = _user_part(block, f"{field}.content[{j}]")
            if part is not None:
                parts.append(part)
    # Tool messages must directly follow the assistant's tool_calls; the user's own content and any
    # images the tools returned (tool messages carry text only) come after them.
    out = tool_messages
    if images or parts:
        out.append({"role": "user", "content": _collapse(images + parts)})
    elif not tool_messages:
        out.append({"role": "user", "content": ""})
    return out


def _assistant_message(content: Any, field: str, names: ToolNameMap) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    reasoning: list[str] = []
    saw_thinking = False
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(need_list(content, f"{field}.content")):
        block = need_dict(block, f"{field}.content[{j}]")
        kind = block.get("type")
        if kind == "text":
            if block.get("text"):
                texts.append(str(block["text"]))
        elif kind == "thinking":
            saw_thinking = True
            if block.get("thinking"):
                reasoning.append(str(block["thinking"]))
        elif kind == "redacted_thinking":
            saw_thinking = True  # encrypted for Anthropic only; nothing to carry
        elif kind == "tool_use":
            name = block.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"{field}.content[{j}].name: required", param=f"{field}.content[{j}].name")
            tool_calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": names.to_upstream(name),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )
        # server_tool_use, web_search_tool_result and other server-side blocks: the upstream ran none
        # of them and cannot take them back; dropped (docs/translation.md).
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or (None if tool_calls else "")}
    if tool_calls:
        message["tool_calls"] = tool_calls
    # DeepSeek's thinking mode rejects a tool-call turn whose reasoning_content is missing (even "").
    if tool_calls or saw_thinking:
        message["reasoning_content"] = "".join(reasoning)
    return message


def _openai_tools(tools: Any, names: ToolNameMap) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(need_list(tools, "tools")):
        tool = need_dict(tool, f"tools[{i}]")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            # Server tools (web_search_..., code_execution_...) run at Anthropic and Anthropic-defined
            # client tools (bash_..., computer_...) have no schema we could send: the upstream cannot
            # offer them, so they are dropped and the rest of the request still works (Claude Code
            # sends WebSearch this way on every turn).
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}].name: required", param=f"tools[{i}].name")
        function: dict[str, Any] = {
            "name": names.to_upstream(name),
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _openai_tool_choice(choice: Any, names: ToolNameMap) -> tuple[Any, bool | None]:
    """Anthropic tool_choice -> (OpenAI tool_choice, parallel_tool_calls or None)."""
    choice = need_dict(choice, "tool_choice")
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("tool_choice.name: required when type is tool", param="tool_choice.name")
        return {"type": "function", "function": {"name": names.to_upstream(name)}}, parallel
    raise BadRequest(f"tool_choice.type: unknown value {kind!r}", param="tool_choice.type")


def _reminder(msg: dict[str, Any], field: str) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        text = content
    else:
        text = "\n\n".join(
            str(b.get("text", "")) for b in need_list(content, f"{field}.content") if isinstance(b, dict)
        )
    return f"<system-reminder>\n{text}\n</system-reminder>"


def _with_text(msg: dict[str, Any], text: str, *, first: bool) -> dict[str, Any]:
    content = msg.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    block = {"type": "text", "text": text}
    return {**msg, "content": [block, *blocks] if first else [*blocks, block]}


def _fold_system_messages(messages: list[Any]) -> list[Any]:
    """Claude Code puts ``role: "system"`` messages inside ``messages`` (mid-conversation-system
    beta) for model names it does not know. OpenAI-format upstreams differ on where they accept a
    system message (several want one, first), so each is folded into the adjacent user turn as
    ``<system-reminder>`` text: what Claude Code itself does when a server refuses them."""
    if not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return messages
    out: list[Any] = []
    pending: list[str] = []  # system text waiting for the next user turn
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and msg.get("role") == "system":
            text = _reminder(msg, f"messages[{i}]")
            if out and isinstance(out[-1], dict) and out[-1].get("role") == "user":
                out[-1] = _with_text(out[-1], text, first=False)
            else:
                pending.append(text)
            continue
        if pending and isinstance(msg, dict) and msg.get("role") == "user":
            msg = _with_text(msg, "\n\n".join(pending), first=True)
            pending = []
        out.append(msg)
    if pending:
        out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


def _output_format(body: dict[str, Any]) -> dict[str, Any] | None:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return fmt
    return None


def _schema_instruction(body: dict[str, Any], capabilities: Capabilities) -> str:
    # json_object mode gives valid JSON but no schema: the schema goes to the model as an instruction
    # (DeepSeek also requires the word "json" in the prompt for that mode).
    fmt = _output_format(body)
    if fmt is None or capabilities.structured_output != "json_object":
        return ""
    return "Respond with a single JSON object that matches this JSON schema:\n" + json.dumps(
        fmt["schema"], ensure_ascii=False
    )


def _response_format(body: dict[str, Any], capabilities: Capabilities) -> dict[str, Any] | None:
    fmt = _output_format(body)
    if fmt is None or capabilities.structured_output == "none":
        return None
    if capabilities.structured_output == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def anthropic_to_openai_request(
    body: dict[str, Any],
    *,
    upstream_model: str,
    max_tokens: int,
    names: ToolNameMap | None = None,
    capabilities: Capabilities | None = None,
) -> dict[str, Any]:
    """Anthropic Messages request -> OpenAI chat request for an OpenAI-format upstream (DeepSeek).

    Pass a ``ToolNameMap`` to learn which tool names were shortened; hand the same map to the
    response/stream translators so the client sees its own names again.
    """
    names = names if names is not None else ToolNameMap()
    capabilities = capabilities or Capabilities()
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    schema_note = _schema_instruction(body, capabilities)
    if schema_note:
        system = f"{system}\n\n{schema_note}" if system else schema_note
    if system:
        messages.append({"role": "system", "content": system})
    for i, msg in enumerate(_fold_system_messages(need_list(body.get("messages"), "messages"))):
        msg = need_dict(msg, f"messages[{i}]")
        role = msg.get("role")
        if role == "user":
            messages.extend(_user_messages(msg.get("content"), f"messages[{i}]"))
        elif role == "assistant":
            messages.append(_assistant_message(msg.get("content"), f"messages[{i}]", names))
        else:
            raise BadRequest(f"messages[{i}].role: must be user or assistant", param=f"messages[{i}].role")

    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": messages,
        "max_tokens": cap_max_tokens(body.get("max_tokens"), max_tokens, "max_tokens"),
    }
    if body.get("stream"):
        out["stream"] = True
        # Without include_usage an OpenAI-format stream reports no usage, and the gateway bills from it.
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        value = number(body, key)
        if value is not None:
            out[key] = value
    stops = body.get("stop_sequences")
    if stops:
        out["stop"] = [str(s) for s in need_list(stops, "stop_sequences")][:MAX_STOP_SEQUENCES]
    if body.get("tools"):
        out["tools"] = _openai_tools(body["tools"], names)
    if body.get("tool_choice") is not None:
        choice, parallel = _openai_tool_choice(body["tool_choice"], names)
        if "tools" in out:  # OpenAI rejects tool_choice without tools
            out["tool_choice"] = choice
            if parallel is not None:
                out["parallel_tool_calls"] = parallel
    out.update(openai_reasoning(body, capabilities.reasoning))
    response_format = _response_format(body, capabilities)
    if response_format is not None:
        out["response_format"] = response_format
    # Deliberately dropped: metadata.user_id (Claude Code's device and session ids must not reach a
    # third party), top_k, cache_control (everywhere), tool strict/defer_loading, context_management,
    # container, mcp_servers, service_tier, betas (docs/translation.md).
    return out
