"""Pure translation between Anthropic Messages, OpenAI Chat Completions and the OpenAI Responses API:
requests, responses, streams."""

from __future__ import annotations

from gateway.translate.names import ToolNameMap, sanitize_tool_id
from gateway.translate.requests import anthropic_to_openai_request, openai_to_anthropic_request
from gateway.translate.responses import (
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    openai_error_to_anthropic,
    openai_to_anthropic_response,
)
from gateway.translate.responses_body import anthropic_to_responses_response, chat_to_responses_response
from gateway.translate.responses_request import responses_to_chat_request
from gateway.translate.responses_stream import ChatToResponsesStream
from gateway.translate.responses_stream_anthropic import AnthropicToResponsesStream
from gateway.translate.responses_tools import ResponsesToolMap
from gateway.translate.streams import AnthropicToOpenAIStream, OpenAIToAnthropicStream
from gateway.translate.usage import anthropic_usage_to_openai, openai_usage_to_anthropic

__all__ = [
    "AnthropicToOpenAIStream",
    "AnthropicToResponsesStream",
    "ChatToResponsesStream",
    "OpenAIToAnthropicStream",
    "ResponsesToolMap",
    "ToolNameMap",
    "anthropic_error_to_openai",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "anthropic_to_responses_response",
    "anthropic_usage_to_openai",
    "chat_to_responses_response",
    "openai_error_to_anthropic",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
    "openai_usage_to_anthropic",
    "responses_to_chat_request",
    "sanitize_tool_id",
]
