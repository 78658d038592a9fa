"""Request bodies translated between Anthropic Messages and OpenAI Chat Completions (pure, no I/O).

Field-level decisions (what is dropped, what is refused with 400) are tabled in docs/translation.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.errors import BadRequest
from gateway.translate.names import ToolNameMap, sanitize_tool_id

__all__ = ["MAX_STOP_SEQUENCES", "anthropic_to_openai_request", "openai_to_anthropic_request"]

MAX_STOP_SEQUENCES = 4  # OpenAI's limit on `stop`
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)$", re.DOTALL)


def _need_list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{field}: must be an array", param=field)
    return value


def _need_dict(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{field}: must be an object", param=field)
    return value


def _cap_max_tokens(requested: Any, cap: int, field: str) -> int:
    if requested is None:
        return cap
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise BadRequest(f"{field}: must be a positive integer", param=field)
    return min(requested, cap)


def _number(body: dict[str, Any], key: str) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key}: must be a number", param=key)
    return value


# ---------------------------------------------------------------------------------------------------
# Anthropic -> OpenAI


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    parts: list[str] = []
    for i, block in enumerate(_need_list(system, "system")):
        block = _need_dict(block, f"system[{i}]")
        if block.get("type") != "text":
            raise BadRequest(f"system[{i}].type: only text blocks are supported", param=f"system[{i}].type")
        if block.get("text"):
            parts.append(str(block["text"]))
    return "\n\n".join(parts)


def _image_part(block: dict[str, Any], field: str) -> dict[str, Any]:
    source = _need_dict(block.get("source"), f"{field}.source")
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
        raise BadRequest(f"{field}: only plain-text documents can be sent to this model", param=field)
    if kind in ("thinking", "redacted_thinking"):
        return None  # not meaningful on a user turn
    raise BadRequest(
        f"{field}.type: block type {kind!r} is not supported by this model", param=f"{field}.type"
    )


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
            sub = _need_dict(sub, f"{field}.content[{j}]")
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
    for j, block in enumerate(_need_list(content, f"{field}.content")):
        block = _need_dict(block, f"{field}.content[{j}]")
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
    for j, block in enumerate(_need_list(content, f"{field}.content")):
        block = _need_dict(block, f"{field}.content[{j}]")
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
        else:
            raise BadRequest(
                f"{field}.content[{j}].type: block type {kind!r} is not supported by this model",
                param=f"{field}.content[{j}].type",
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or (None if tool_calls else "")}
    if tool_calls:
        message["tool_calls"] = tool_calls
    # DeepSeek's thinking mode rejects a tool-call turn whose reasoning_content is missing (even "").
    if tool_calls or saw_thinking:
        message["reasoning_content"] = "".join(reasoning)
    return message


def _openai_tools(tools: Any, names: ToolNameMap) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(_need_list(tools, "tools")):
        tool = _need_dict(tool, f"tools[{i}]")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            # Server tools (web_search_...) and Anthropic-defined client tools (bash_..., computer_...)
            # have no schema we could send; saying so beats a model that silently lacks the tool.
            raise BadRequest(
                f"tools[{i}].type: tool type {kind!r} is not supported by this model",
                param=f"tools[{i}].type",
            )
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
    choice = _need_dict(choice, "tool_choice")
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


def anthropic_to_openai_request(
    body: dict[str, Any], *, upstream_model: str, max_tokens: int, names: ToolNameMap | None = None
) -> dict[str, Any]:
    """Anthropic Messages request -> OpenAI chat request for an OpenAI-format upstream (DeepSeek).

    Pass a ``ToolNameMap`` to learn which tool names were shortened; hand the same map to the
    response/stream translators so the client sees its own names again.
    """
    names = names if names is not None else ToolNameMap()
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, msg in enumerate(_need_list(body.get("messages"), "messages")):
        msg = _need_dict(msg, f"messages[{i}]")
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
        "max_tokens": _cap_max_tokens(body.get("max_tokens"), max_tokens, "max_tokens"),
    }
    if body.get("stream"):
        out["stream"] = True
        # Without include_usage an OpenAI-format stream reports no usage, and the gateway bills from it.
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        value = _number(body, key)
        if value is not None:
            out[key] = value
    stops = body.get("stop_sequences")
    if stops:
        out["stop"] = [str(s) for s in _need_list(stops, "stop_sequences")][:MAX_STOP_SEQUENCES]
    if body.get("tools"):
        out["tools"] = _openai_tools(body["tools"], names)
    if body.get("tool_choice") is not None:
        choice, parallel = _openai_tool_choice(body["tool_choice"], names)
        if "tools" in out:  # OpenAI rejects tool_choice without tools
            out["tool_choice"] = choice
            if parallel is not None:
                out["parallel_tool_calls"] = parallel
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        out["user"] = metadata["user_id"]
    # Deliberately dropped: top_k, cache_control (everywhere), thinking, output_config, betas,
    # context_management, container, mcp_servers, service_tier (docs/translation.md).
    return out


# ---------------------------------------------------------------------------------------------------
# OpenAI -> Anthropic


def _plain_text(content: Any, field: str) -> str:
    """System, developer and tool content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(_need_list(content, f"{field}.content")):
        part = _need_dict(part, f"{field}.content[{j}]")
        if part.get("type") not in ("text", "refusal"):
            raise BadRequest(
                f"{field}.content[{j}].type: only text parts are allowed here",
                param=f"{field}.content[{j}].type",
            )
        texts.append(str(part.get("text") or part.get("refusal") or ""))
    return "\n\n".join(t for t in texts if t)


def _image_block(part: dict[str, Any], field: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{field}.image_url.url: required", param=f"{field}.image_url.url")
    match = _DATA_URL.match(url)
    if match:
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": match["mime"], "data": match["data"]},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(
        f"{field}.image_url.url: must be a base64 data URL or an http(s) URL", param=f"{field}.image_url.url"
    )


def _content_blocks(content: Any, field: str) -> list[dict[str, Any]]:
    """User or assistant content -> Anthropic blocks, empty text dropped (Anthropic rejects it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(_need_list(content, f"{field}.content")):
        part = _need_dict(part, f"{field}.content[{j}]")
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get("text") if kind == "text" else part.get("refusal")
            if text:
                blocks.append({"type": "text", "text": str(text)})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{field}.content[{j}]"))
        else:
            raise BadRequest(
                f"{field}.content[{j}].type: part type {kind!r} is not supported by this model",
                param=f"{field}.content[{j}].type",
            )
    return blocks


def _tool_use_blocks(tool_calls: Any, field: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, call in enumerate(_need_list(tool_calls, f"{field}.tool_calls")):
        call = _need_dict(call, f"{field}.tool_calls[{j}]")
        function = _need_dict(call.get("function"), f"{field}.tool_calls[{j}].function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(
                f"{field}.tool_calls[{j}].function.name: required",
                param=f"{field}.tool_calls[{j}].function.name",
            )
        arguments = function.get("arguments")
        args_field = f"{field}.tool_calls[{j}].function.arguments"
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            parsed: Any = {}  # tools without parameters often stream no arguments at all
        elif isinstance(arguments, dict):
            parsed = arguments
        else:
            try:
                parsed = json.loads(arguments)
            except (TypeError, ValueError):
                raise BadRequest(f"{args_field}: not valid JSON", param=args_field) from None
        if not isinstance(parsed, dict):
            raise BadRequest(f"{args_field}: must encode a JSON object", param=args_field)
        blocks.append(
            {
                "type": "tool_use",
                "id": sanitize_tool_id(str(call.get("id") or f"call_{j}")),
                "name": name,
                "input": parsed,
            }
        )
    return blocks


def _merge_turns(turns: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Drop empty turns, merge consecutive same-role turns, tool_results first in each user turn."""
    merged: list[dict[str, Any]] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": list(blocks)})
    for message in merged:
        if message["role"] == "user":
            content = message["content"]
            # Anthropic requires the answers to the previous tool_use blocks to open the user turn.
            content.sort(key=lambda b: b.get("type") != "tool_result")
    return merged


def _anthropic_tools(tools: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(_need_list(tools, "tools")):
        tool = _need_dict(tool, f"tools[{i}]")
        if tool.get("type") != "function":
            raise BadRequest(f"tools[{i}].type: only function tools are supported", param=f"tools[{i}].type")
        function = _need_dict(tool.get("function"), f"tools[{i}].function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}].function.name: required", param=f"tools[{i}].function.name")
        converted: dict[str, Any] = {
            "name": name,
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            converted["description"] = function["description"]
        out.append(converted)
    return out


def _anthropic_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("tool_choice.function.name: required", param="tool_choice.function.name")
        result = {"type": "tool", "name": name}
    else:
        raise BadRequest(
            "tool_choice: must be none, auto, required or a function choice", param="tool_choice"
        )
    if parallel is False:
        result = result or {"type": "auto"}
        result["disable_parallel_tool_use"] = True
    return result


_REFUSED_FIELDS = {
    "audio": "audio output is not supported by this model",
    "functions": "deprecated; use tools",
    "function_call": "deprecated; use tool_choice",
    "logprobs": "log probabilities are not available from this model",
    "top_logprobs": "log probabilities are not available from this model",
}


def openai_to_anthropic_request(
    body: dict[str, Any], *, upstream_model: str, max_tokens: int
) -> dict[str, Any]:
    """OpenAI chat request -> Anthropic Messages request for an Anthropic-format upstream."""
    for key, why in _REFUSED_FIELDS.items():
        if body.get(key) not in (None, False, [], 0):
            raise BadRequest(f"{key}: {why}", param=key)
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("n: only one choice per request is supported", param="n")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise BadRequest("modalities: only text output is supported", param="modalities")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        raise BadRequest(
            "response_format: json_schema is not supported by this model", param="response_format.type"
        )

    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, msg in enumerate(_need_list(body.get("messages"), "messages")):
        msg = _need_dict(msg, f"messages[{i}]")
        role = msg.get("role")
        field = f"messages[{i}]"
        if role in ("system", "developer"):
            text = _plain_text(msg.get("content"), field)
            if text:
                system.append(text)
        elif role == "user":
            turns.append(("user", _content_blocks(msg.get("content"), field)))
        elif role == "assistant":
            blocks = _content_blocks(msg.get("content"), field)
            if msg.get("tool_calls"):
                blocks += _tool_use_blocks(msg["tool_calls"], field)
            turns.append(("assistant", blocks))
        elif role == "tool":
            tool_call_id = msg.get("tool_call_id")
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise BadRequest(f"{field}.tool_call_id: required", param=f"{field}.tool_call_id")
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": sanitize_tool_id(tool_call_id)}
            text = _plain_text(msg.get("content"), field)
            if text:
                result["content"] = text
            turns.append(("user", [result]))
        else:
            raise BadRequest(f"{field}.role: unknown role {role!r}", param=f"{field}.role")

    requested = body.get("max_completion_tokens")
    field = "max_completion_tokens"
    if requested is None:
        requested, field = body.get("max_tokens"), "max_tokens"
    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": _merge_turns(turns),
        "max_tokens": _cap_max_tokens(requested, max_tokens, field),
    }
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("stream"):
        out["stream"] = True
    temperature = _number(body, "temperature")
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0), 1)  # OpenAI allows 0..2, Anthropic 0..1
    top_p = _number(body, "top_p")
    if top_p is not None:
        out["top_p"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str) and stop:
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [str(s) for s in stop if s]
    if body.get("tools"):
        out["tools"] = _anthropic_tools(body["tools"])
        choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    # Deliberately dropped: seed, penalties, logit_bias, stream_options, store, prediction,
    # reasoning_effort, service_tier, response_format text/json_object (docs/translation.md).
    return out
