"""Anthropic stream events -> the Responses API event stream.

Each event becomes the Chat chunk dict it stands for and goes through ``ChatToResponsesStream``,
so both upstream formats share one event writer; nothing is JSON-encoded in between.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.translate.responses_body import anthropic_usage_to_chat
from gateway.translate.responses_stream import ChatToResponsesStream
from gateway.translate.stop_reasons import openai_finish_reason

__all__ = ["AnthropicToResponsesStream"]


class AnthropicToResponsesStream:
    """Anthropic stream events -> Chat chunk dicts -> ``ChatToResponsesStream`` (no JSON in between)."""

    def __init__(self, **kwargs: Any) -> None:
        self._inner = ChatToResponsesStream(**kwargs)
        self._tool_k: dict[int, int] = {}
        self._prefilled: set[int] = set()
        self._stop: str | None = None
        self._usage: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self._inner.done

    def start(self) -> bytes:
        return self._inner.start()

    def ping(self) -> bytes:
        return self._inner.ping()

    def finish(self) -> bytes:
        return self._inner.finish()

    def error(self, err_type: str, message: str) -> bytes:
        return self._inner.error(err_type, message)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return self._inner.feed({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def feed(self, event_type: str | None, data: dict[str, Any]) -> bytes:
        kind = event_type or data.get("type")
        if kind == "message_start":
            self._merge_usage((data.get("message") or {}).get("usage"))
            return self._inner.start()
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "content_block_delta":
            return self._block_delta(data)
        if kind == "message_delta":
            stop = (data.get("delta") or {}).get("stop_reason")
            if stop:
                self._stop = stop
            self._merge_usage(data.get("usage"))
            return b""
        if kind == "message_stop":
            finish = openai_finish_reason(self._stop)
            return self._inner.feed(
                {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                    "usage": anthropic_usage_to_chat(self._usage),
                }
            )
        if kind == "error":
            error = data.get("error") or {}
            return self.error(
                str(error.get("type") or "api_error"), str(error.get("message") or "upstream error")
            )
        return b""  # ping, content_block_stop, unknown future events

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):  # cumulative: present fields replace, never add
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    def _block_start(self, data: dict[str, Any]) -> bytes:
        block = data.get("content_block") or {}
        index = data.get("index")
        kind = block.get("type")
        if kind == "tool_use" and isinstance(index, int):
            k = len(self._tool_k)
            self._tool_k[index] = k
            call = {"index": k, "id": str(block.get("id") or ""), "type": "function"}
            function = {"name": str(block.get("name") or ""), "arguments": ""}
            initial = block.get("input")
            if isinstance(initial, dict) and initial:  # input given whole at the start, not streamed
                self._prefilled.add(index)
                function["arguments"] = json.dumps(initial, ensure_ascii=False)
            return self._delta({"tool_calls": [{**call, "function": function}]})
        if kind == "text" and block.get("text"):
            return self._delta({"content": block["text"]})
        if kind == "thinking" and block.get("thinking"):
            return self._delta({"reasoning_content": block["thinking"]})
        return b""

    def _block_delta(self, data: dict[str, Any]) -> bytes:
        delta = data.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return self._delta({"content": delta["text"]})
        if kind == "thinking_delta" and delta.get("thinking"):
            return self._delta({"reasoning_content": delta["thinking"]})
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = data.get("index")
            if isinstance(index, int) and index in self._tool_k and index not in self._prefilled:
                piece = {"index": self._tool_k[index], "function": {"arguments": delta["partial_json"]}}
                return self._delta({"tool_calls": [piece]})
        return b""  # signature_delta, citations_delta, server-tool blocks
