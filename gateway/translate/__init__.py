"""Pure translation between Anthropic Messages and OpenAI Chat Completions: requests, responses, streams."""

from __future__ import annotations

from gateway.translate.names import ToolNameMap, sanitize_tool_id
from gateway.translate.requests import anthropic_to_openai_request, openai_to_anthropic_request
from gateway.translate.responses import (
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    openai_error_to_anthropic,
    openai_to_anthropic_response,
)
from gateway.translate.streams import AnthropicToOpenAIStream, OpenAIToAnthropicStream
from gateway.translate.usage import anthropic_usage_to_openai, openai_usage_to_anthropic

__all__ = [
    "AnthropicToOpenAIStream",
    "OpenAIToAnthropicStream",
    "ToolNameMap",
    "anthropic_error_to_openai",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "anthropic_usage_to_openai",
    "openai_error_to_anthropic",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
    "openai_usage_to_anthropic",
    "sanitize_tool_id",
]
