"""Responses API ``response`` objects: built from a Chat completion or an Anthropic message (pure).

The stream translator (``responses_stream``) builds the same objects from the same helpers, so a
streamed answer and a non-streamed one look alike to the client.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.errors import ServiceUnavailable
from gateway.translate.custom_input import custom_input_from_arguments
from gateway.translate.names import ToolNameMap
from gateway.translate.responses import anthropic_to_openai_response
from gateway.translate.responses_tools import ResponsesToolMap
from gateway.translate.stop_reasons import OPENAI_OVERLOADED_FINISH
from gateway.translate.usage import anthropic_usage_to_openai
from gateway.translate.usage import count as _int

__all__ = [
    "anthropic_to_responses_response",
    "anthropic_usage_to_chat",
    "chat_to_responses_response",
    "chat_usage_to_responses",
    "incomplete_reason",
    "message_item",
    "reasoning_item",
    "response_object",
    "tool_call_item",
]


def chat_usage_to_responses(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Chat usage (OpenAI, DeepSeek) -> Responses usage; input_tokens includes cached tokens."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    prompt = _int(usage.get("prompt_tokens"))
    if "prompt_cache_hit_tokens" in usage:  # DeepSeek's own field is authoritative when present
        cached = _int(usage.get("prompt_cache_hit_tokens"))
    else:
        cached = _int(details.get("cached_tokens"))
    written = _int(details.get("cache_write_tokens") or details.get("cache_creation_tokens"))
    output = _int(usage.get("completion_tokens"))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(cached, prompt), "cache_write_tokens": written},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": _int(completion_details.get("reasoning_tokens"))},
        "total_tokens": prompt + output,
    }


def anthropic_usage_to_chat(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Anthropic usage -> Chat usage that keeps cache writes apart (prompt_tokens includes them)."""
    chat = anthropic_usage_to_openai(usage)
    chat["prompt_tokens_details"]["cache_write_tokens"] = _int((usage or {}).get("cache_creation_input_tokens"))
    return chat


def incomplete_reason(finish_reason: str | None) -> str | None:
    """The Responses ``incomplete_details.reason`` for a Chat finish reason; None: completed."""
    if finish_reason == "length":
        return "max_output_tokens"
    if finish_reason == "content_filter":
        return "content_filter"
    return None


def _reasoning_echo(request: dict[str, Any]) -> dict[str, Any]:
    reasoning = request.get("reasoning")
    reasoning = reasoning if isinstance(reasoning, dict) else {}
    return {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}


def response_object(
    *,
    response_id: str,
    client_model: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    request: dict[str, Any] | None = None,
    incomplete: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``response`` object as OpenAI returns it, echoing the request's settings."""
    req = request or {}
    text_setting = req.get("text")
    text: dict[str, Any] = text_setting if isinstance(text_setting, dict) else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": client_model,
        "output": output,
        "parallel_tool_calls": req.get("parallel_tool_calls", True) is not False,
        "previous_response_id": None,
        "reasoning": _reasoning_echo(req),
        "service_tier": "default",
        "store": False,
        "temperature": req.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, **text},
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": req.get("tools") or [],
        "top_p": req.get("top_p", 1.0),
        "truncation": req.get("truncation", "disabled"),
        "usage": usage,
        "user": req.get("user"),
        "metadata": req.get("metadata") or {},
    }


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    # A refusal is sent as output_text too: Codex cannot read `refusal` parts (docs/translation.md).
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": [output_text_part(text)],
        "role": "assistant",
    }


def tool_call_item(
    tools: ResponsesToolMap,
    upstream_name: str,
    *,
    item_id: str,
    call_id: str,
    arguments: str | None,
    status: str = "completed",
) -> dict[str, Any]:
    """An upstream function call as the client declared it: function_call or custom_tool_call.

    ``arguments`` None gives the item as announced (``output_item.added``), before any input.
    """
    identity = tools.resolve(upstream_name)
    item: dict[str, Any]
    if identity.kind == "custom":
        text = "" if arguments is None else custom_input_from_arguments(arguments)
        item = {
            "id": item_id,
            "type": "custom_tool_call",
            "call_id": call_id,
            "name": identity.name,
            "input": text,
        }
    else:
        item = {
            "id": item_id,
            "type": "function_call",
            "status": "in_progress" if arguments is None else status,
            "arguments": arguments or "",
            "call_id": call_id,
            "name": identity.name,
        }
    if identity.namespace is not None:
        item["namespace"] = identity.namespace
    return item


def _base(response_id: str) -> str:
    return response_id.removeprefix("resp_") or "gateway"


def chat_to_responses_response(
    resp: dict[str, Any],
    *,
    response_id: str,
    client_model: str,
    tools: ResponsesToolMap | None = None,
    request: dict[str, Any] | None = None,
    created_at: int | None = None,
) -> dict[str, Any]:
    """Chat ``chat.completion`` -> Responses ``response``. Raises ServiceUnavailable on DeepSeek's
    ``insufficient_system_resource`` (an overload, not an answer)."""
    tools = tools if tools is not None else ResponsesToolMap()
    base = _base(response_id)
    choices = resp.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    finish = choice.get("finish_reason")
    if finish == OPENAI_OVERLOADED_FINISH:
        raise ServiceUnavailable("upstream model is overloaded; retry later")
    incomplete = incomplete_reason(finish)
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(reasoning_item(f"rs_{base}_{len(output)}", reasoning))
    text = message.get("content")
    if isinstance(text, list):  # a few upstreams answer with content parts
        text = "".join(str(p.get("text") or "") for p in text if isinstance(p, dict))
    if not (isinstance(text, str) and text):
        refusal = message.get("refusal")
        text = refusal if isinstance(refusal, str) else ""
    if text:
        output.append(
            message_item(f"msg_{base}_{len(output)}", text, "incomplete" if incomplete else "completed")
        )
    for j, call in enumerate(message.get("tool_calls") or []):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        arguments = function.get("arguments")
        name = str(function.get("name") or "")
        prefix = "ctc" if tools.resolve(name).kind == "custom" else "fc"
        output.append(
            tool_call_item(
                tools,
                name,
                item_id=f"{prefix}_{base}_{len(output)}",
                call_id=str(call.get("id") or f"call_{base}_{j}"),
                arguments=arguments if isinstance(arguments, str) and arguments else "{}",
            )
        )
    return response_object(
        response_id=response_id,
        client_model=client_model,
        created_at=int(time.time()) if created_at is None else created_at,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=chat_usage_to_responses(resp.get("usage")),
        request=request,
        incomplete=incomplete,
    )


def anthropic_to_responses_response(
    resp: dict[str, Any],
    *,
    response_id: str,
    client_model: str,
    tools: ResponsesToolMap | None = None,
    request: dict[str, Any] | None = None,
    created_at: int | None = None,
) -> dict[str, Any]:
    """Anthropic ``message`` -> Responses ``response`` (through the Chat shape, usage kept exact)."""
    chat = anthropic_to_openai_response(resp, client_model=client_model, names=ToolNameMap())
    chat["usage"] = anthropic_usage_to_chat(resp.get("usage"))
    return chat_to_responses_response(
        chat,
        response_id=response_id,
        client_model=client_model,
        tools=tools,
        request=request,
        created_at=created_at,
    )
