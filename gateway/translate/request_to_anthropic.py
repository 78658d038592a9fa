"""OpenAI chat request -> Anthropic Messages request, for an Anthropic-format upstream."""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.errors import BadRequest
from gateway.translate.fields import cap_max_tokens, need_dict, need_list, number
from gateway.translate.names import sanitize_tool_id

__all__ = ["openai_to_anthropic_request"]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)$", re.DOTALL)


def _plain_text(content: Any, field: str) -> str:
    """System, developer and tool content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(need_list(content, f"{field}.content")):
        part = need_dict(part, f"{field}.content[{j}]")
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
    for j, part in enumerate(need_list(content, f"{field}.content")):
        part = need_dict(part, f"{field}.content[{j}]")
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
    for j, call in enumerate(need_list(tool_calls, f"{field}.tool_calls")):
        call = need_dict(call, f"{field}.tool_calls[{j}]")
        function = need_dict(call.get("function"), f"{field}.tool_calls[{j}].function")
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
    for i, tool in enumerate(need_list(tools, "tools")):
        tool = need_dict(tool, f"tools[{i}]")
        if tool.get("type") != "function":
            raise BadRequest(f"tools[{i}].type: only function tools are supported", param=f"tools[{i}].type")
        function = need_dict(tool.get("function"), f"tools[{i}].function")
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
    for i, msg in enumerate(need_list(body.get("messages"), "messages")):
        msg = need_dict(msg, f"messages[{i}]")
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
        "max_tokens": cap_max_tokens(requested, max_tokens, field),
    }
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("stream"):
        out["stream"] = True
    temperature = number(body, "temperature")
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0), 1)  # OpenAI allows 0..2, Anthropic 0..1
    top_p = number(body, "top_p")
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
