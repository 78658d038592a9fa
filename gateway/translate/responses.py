"""Non-streaming response bodies and error bodies translated between the two formats (pure, no I/O)."""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.errors import ServiceUnavailable
from gateway.translate.names import ToolNameMap, sanitize_tool_id
from gateway.translate.stop_reasons import (
    OPENAI_OVERLOADED_FINISH,
    anthropic_stop_reason,
    openai_finish_reason,
)
from gateway.translate.usage import anthropic_usage_to_openai, openai_usage_to_anthropic

__all__ = [
    "SYNTHETIC_SIGNATURE",
    "anthropic_error_to_openai",
    "anthropic_error_type_for_status",
    "anthropic_to_openai_response",
    "openai_error_to_anthropic",
    "openai_error_type_for_anthropic",
    "openai_to_anthropic_response",
    "parse_tool_arguments",
]

# Thinking blocks need a signature field; ours is never verified (the reasoning came from an
# OpenAI-format upstream that ignores it) and must never be sent to real Anthropic.
SYNTHETIC_SIGNATURE = "gateway-synthetic-signature"
_MAX_ERROR_MESSAGE = 500


def parse_tool_arguments(arguments: Any) -> dict[str, Any]:
    """An upstream's tool arguments string -> object; ``{}`` when empty, invalid or not an object.

    A response cannot be refused, so a model's broken JSON becomes an empty input rather than an error.
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def openai_to_anthropic_response(
    resp: dict[str, Any],
    *,
    client_model: str,
    names: ToolNameMap | None = None,
    message_id: str | None = None,
) -> dict[str, Any]:
    """OpenAI chat.completion -> Anthropic message. Raises ServiceUnavailable on DeepSeek's
    ``insufficient_system_resource`` (an overload, not an answer)."""
    names = names if names is not None else ToolNameMap()
    choices = resp.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    finish = choice.get("finish_reason")
    if finish == OPENAI_OVERLOADED_FINISH:
        raise ServiceUnavailable("upstream model is overloaded; retry later")
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": SYNTHETIC_SIGNATURE})
    text = message.get("content")
    if isinstance(text, list):  # a few upstreams answer with content parts
        text = "".join(str(p.get("text") or "") for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal and not text:
        content.append({"type": "text", "text": refusal})
    for j, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": sanitize_tool_id(str(call.get("id") or f"toolu_{j}")),
                "name": names.to_client(str(function.get("name") or "")),
                "input": parse_tool_arguments(function.get("arguments")),
            }
        )
    made_tool_calls = any(b["type"] == "tool_use" for b in content)
    stop_reason = anthropic_stop_reason(finish, made_tool_calls=made_tool_calls)
    if refusal and not text and finish in (None, "stop"):
        stop_reason = "refusal"
    return {
        "id": message_id or f"msg_{sanitize_tool_id(str(resp.get('id') or 'gateway'))}",
        "type": "message",
        "role": "assistant",
        "model": client_model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": openai_usage_to_anthropic(resp.get("usage")),
    }


def anthropic_to_openai_response(
    resp: dict[str, Any],
    *,
    client_model: str,
    names: ToolNameMap | None = None,
    completion_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """Anthropic message -> OpenAI chat.completion (thinking goes to ``reasoning_content``)."""
    names = names if names is not None else ToolNameMap()
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in resp.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking") or ""))
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {
                        "name": names.to_client(str(block.get("name") or "")),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )
        # redacted_thinking and server-tool blocks have no OpenAI counterpart.
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": completion_id or f"chatcmpl-{resp.get('id') or 'gateway'}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": client_model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": openai_finish_reason(resp.get("stop_reason")),
            }
        ],
        "usage": anthropic_usage_to_openai(resp.get("usage")),
    }


# ---------------------------------------------------------------------------------------------------
# Errors

_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# (OpenAI error.type, error.code) for each Anthropic error.type
_OPENAI_BY_ANTHROPIC_TYPE: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("permission_error", None),
    "not_found_error": ("invalid_request_error", "model_not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
}


def anthropic_error_type_for_status(status: int) -> str:
    if status in _ANTHROPIC_TYPE_BY_STATUS:
        return _ANTHROPIC_TYPE_BY_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def _error_message(body: Any, status: int) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        return f"upstream returned HTTP {status}"
    return message[:_MAX_ERROR_MESSAGE]


def openai_error_to_anthropic(status: int, body: Any) -> dict[str, Any]:
    """An OpenAI-format error body (any shape, even not JSON) -> Anthropic error body."""
    err_type = anthropic_error_type_for_status(status)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("type") == "insufficient_quota":
        err_type = "billing_error"  # OpenAI reports exhausted quota as 429
    return {"type": "error", "error": {"type": err_type, "message": _error_message(body, status)}}


def anthropic_error_to_openai(status: int, body: Any) -> dict[str, Any]:
    """An Anthropic error body (any shape) -> OpenAI error body."""
    error = body.get("error") if isinstance(body, dict) else None
    err_type = error.get("type") if isinstance(error, dict) else None
    if not isinstance(err_type, str) or err_type not in _OPENAI_BY_ANTHROPIC_TYPE:
        err_type = anthropic_error_type_for_status(status)
    openai_type, code = _OPENAI_BY_ANTHROPIC_TYPE[err_type]
    return {
        "error": {"message": _error_message(body, status), "type": openai_type, "param": None, "code": code}
    }


def openai_error_type_for_anthropic(err_type: str) -> tuple[str, str | None]:
    return _OPENAI_BY_ANTHROPIC_TYPE.get(err_type, ("server_error", None))
